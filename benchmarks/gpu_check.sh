#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of under ten minutes:
#   1. the CUDA tests (tests/engine/test_cuda.py, SAMLoss under CUDA autocast, the
#      metrics on CUDA);
#   2. explanation and mining under autocast float16 / bfloat16 against float32
#      (benchmarks/gpu_precision.py -> results/gpu_precision.md);
#   3. the CUDA rows of bench_explain (ResNet-50, batches 1 and 8 -> results/bench_explain_cuda.md).
# Its log goes to benchmarks/results/gpu_check.log ($SIMEXPLAIN_RESULTS overrides the
# folder). Without a GPU every part says so and is skipped, and the script exits 0, so it
# also runs on a CPU-only machine.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, the venv active
set -uo pipefail
cd "$(dirname "$0")/.."
results="${SIMEXPLAIN_RESULTS:-benchmarks/results}"
mkdir -p "$results"
log="$results/gpu_check.log"
status=0
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  python -c "import torch; print('torch', torch.__version__, '| CUDA:',
             torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  has_cuda=$(python -c "import torch; print(int(torch.cuda.is_available()))")

  echo "## 1. CUDA tests"
  timeout 240 python -m pytest -q -rs -p no:cacheprovider -k cuda \
      tests/engine/test_cuda.py tests/training/test_sam_loss.py tests/metrics/test_map_metrics.py \
    || status=1

  echo "## 2. half precision"
  timeout 180 python benchmarks/gpu_precision.py --out "$results/gpu_precision.md" || status=1

  echo "## 3. bench_explain, CUDA rows"
  if [ "$has_cuda" = 1 ]; then
    timeout 180 python benchmarks/bench_explain.py --quick --no-cpu --no-memory \
        --out "$results/bench_explain_cuda.md" || status=1
  else
    echo "no CUDA device: skipped"
  fi
  echo "exit status $status"
} 2>&1 | tee "$log.tmp"
mv "$log.tmp" "$log"
exit "$status"
