"""Build docs/report-paper.md (with figure2-paper.png, figure3-paper.png, results-paper.json) from the
full-data campaign's run folders and their full evaluations; stages not finished are listed as pending.

    python tools/paper_report.py runs/campaign --evals runs/campaign-eval --data-dir ../shared/data \
        --machine "AMD EPYC ..., 1 thread" \
        --bench benchmarks/results/bench-core-redesign.json --out docs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from advgen.errors import UserError
from advgen.apps.paper import EVAL_FILE, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="the campaign's folder: base/, gen_paper/, minmax_paper/, ...")
    p.add_argument("--evals", type=Path, help=f"folder of STAGE.json full evaluations (default: RUN/{EVAL_FILE})")
    p.add_argument("--data-dir", help="CIFAR-10 folder, for Figure 2's images")
    p.add_argument("--machine", help="where the campaign trained (its run.json files do not record it)")
    p.add_argument("--bench", type=Path, help="a bench.json of benchmarks/bench.py: its interleaved ratios beside Table 1")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    try:
        path = build(args.runs, args.out, evals_dir=args.evals, data_dir=args.data_dir, machine=args.machine,
                     bench=args.bench)
    except UserError as e:
        print(f"paper_report: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
