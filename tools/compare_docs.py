"""Copy a finished `advgen compare` into docs/ under a name: docs/compare-NAME.json, compare-NAME.md and
curves-NAME.png / curves-NAME-seconds.png (and overfitting-NAME.png where the runs watched for catastrophic
overfitting), re-rendered from the comparison's compare.json by this
checkout's report code (nothing is trained or evaluated).

    python tools/compare_docs.py experiments/compare-quick --name quick --out docs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from advgen.io import read_json
from advgen.apps.compare.report import write_report
from advgen.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("comparison", type=Path, help="the folder advgen compare wrote (it holds compare.json)")
    p.add_argument("--name", required=True, help="the name in docs/: compare-NAME.json, ...")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    try:
        results = read_json(args.comparison / "compare.json")
        if not isinstance(results.get("rows"), list) or "settings" not in results:
            raise UserError(f"{args.comparison / 'compare.json'} is not the output of advgen compare")
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(results, args.out, suffix=f"-{args.name}"))
    except UserError as e:
        print(f"compare_docs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
