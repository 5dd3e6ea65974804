#!/usr/bin/env bash
# A session lent a GPU (the device tool: one call of at most 10 minutes, 64 MiB of working tree, no
# network, no ../shared there) runs issue #30's checks in one call:
#
#   bash tools/gpu_session.sh prepare   # here: .gpudata/ (CIFAR-10 cut to 8,000 training and 1,000 test
#                                       # images, to fit the 64 MiB) and .whl/site/ (pyautoattack without its
#                                       # 44 MB example model), both ignored by git
#   device run, carry [".gpudata", ".whl"]:
#     set -o pipefail; GPU_CHECK_SECONDS=370 AB_SECONDS=360 bash tools/gpu_session.sh go 2>&1 | tee $OUT/go.log
#
# `go` (there): benchmarks/gpu_check.sh in the foreground and benchmarks/precision_ab.py (nfgsm-l2 and
# gen-sdi-l2, fp32 and bf16, seeds 0-2, 12 runs side by side, AutoAttack on 500 test images) in the
# background; both outputs and the A/B's records (no weights) come back in $OUT. AB_ARGS adds flags to the
# A/B, GPU_CHECK_SKIP skips gpu_check stages (a regex on their names).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  grep -qx '/.gpudata/' .git/info/exclude || printf '/.gpudata/\n/.whl/\n' >> .git/info/exclude
  mkdir -p .gpudata/cifar-10-batches-py .whl/site /tmp/gpu-whl
  python3 -m pip download -q --no-deps -d /tmp/gpu-whl pyautoattack==0.2.0
  (cd .whl/site && unzip -qo /tmp/gpu-whl/pyautoattack-0.2.0-py3-none-any.whl -x 'pyautoattack/examples/*')
  python3 - "${DATA:-../shared/data}/cifar-10-batches-py" .gpudata/cifar-10-batches-py <<'PY'
import pickle, shutil, sys
import numpy as np
src, dst = sys.argv[1:]
shutil.copy(f"{src}/batches.meta", dst)
def cut(name, n, out):   # the first n images of a batch; protocol 4 stores the bytes as they are
    b = pickle.load(open(f"{src}/{name}", "rb"), encoding="bytes")
    keep = {b"batch_label": b[b"batch_label"], b"labels": np.asarray(b[b"labels"][:n], np.int64),
            b"data": b[b"data"][:n].copy(), b"filenames": b[b"filenames"][:n]}
    pickle.dump(keep, open(f"{dst}/{out}", "wb"), protocol=4)
cut("data_batch_1", 8000, "data_batch_1")
for i in range(2, 6):
    cut("data_batch_1", 0, f"data_batch_{i}")
cut("test_batch", 1000, "test_batch")
PY
  du -sh .gpudata .whl ;;
go)
  export PYTHONPATH=$PWD/.whl/site:$PWD/src PYTHONUNBUFFERED=1
  mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH
  mkdir -p ../shared; [ -e ../shared/data ] || ln -s "$PWD/.gpudata" ../shared/data   # where the tests look
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  python -c "import torch, pyautoattack; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  AB=/tmp/ab
  ( timeout "${AB_SECONDS:-360}" python benchmarks/precision_ab.py --data-dir .gpudata --out $AB --device cuda \
      --test-subset 500 --jobs 12 ${AB_ARGS:-} > "$OUT/ab-driver.log" 2>&1
    echo "A/B driver ended rc=$? at ${SECONDS} s" >> "$OUT/ab-driver.log" ) &
  ABPID=$!
  bash benchmarks/gpu_check.sh --data-dir .gpudata
  cp benchmarks/results/gpu-check-*.txt benchmarks/results/gpu-bench-*.json "$OUT"/ 2>/dev/null
  wait $ABPID
  python benchmarks/precision_ab.py --out $AB --report-only > "$OUT/ab-report.txt" 2>&1
  tail -n 3 "$OUT/ab-driver.log"; cat "$OUT/ab-report.txt"
  tar czf "$OUT/ab.tar.gz" -C $AB --exclude='*.safetensors' . ;;
*)
  echo "usage: bash tools/gpu_session.sh prepare|go" >&2; exit 2 ;;
esac
