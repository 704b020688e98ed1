#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py): every GPU figure of BENCHMARKS.md in one run, ~9 minutes on one H100.
#
# Once, in a development checkout (needs ../shared and the packaged MiniLM):
#   bash ../shared/device/make-ray-bundle.sh          # Ray for the GPU machine's Python -> .devbundle/site.tar.xz
#   python -m bench.gpu_suite --prepare               # SQuAD v1.1 + MiniLM (bf16) -> .gpu-suite/ (ignored)
# On the GPU machine, two device runs back to back (Ray's bundle and MiniLM do not fit one 64 MiB carry):
#   carry [".devbundle", ".gpu-suite/data", ".gpu-suite/tokenizer"]:
#     bash bench/gpu_suite.sh --steps train,serve,cold,cuda_graph --out-dir "$OUT"      # ~6 min
#   carry [".gpu-suite"]:
#     bash bench/gpu_suite.sh --steps squad --out-dir "$OUT"                             # ~3 min, no Ray
# On CPU, tiny models and settings, a couple of minutes on a quiet machine (checks the whole path):
#   bash bench/gpu_suite.sh --dry-run --out-dir /tmp/gpu-suite
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the GPU machine has no install of this project
if [ -f .devbundle/site.tar.xz ] && ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/site && tar -xJf .devbundle/site.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" -m bench.gpu_suite "$@"
