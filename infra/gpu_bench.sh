#!/usr/bin/env bash
# `python -m kpscale.bench gpu` on a lent GPU machine (the device tool) whose Python (3.12, torch
# with CUDA) lacks kpscale's lighter dependencies and reaches no network.
#   bash infra/gpu_bench.sh prepare          # here: wheels into .whl/, DeepSpeed's package into .ds/
#   bash infra/gpu_bench.sh run [ARGS]       # there, carrying .whl and .ds: bench gpu ARGS, at most 9 min
# DeepSpeed is an sdist, so its installed package folder travels instead of a wheel. Ray and
# MLflow are not needed (bench gpu imports neither). Figures land in $OUT/gpu_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    rm -rf .whl .ds && mkdir -p .whl .ds
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7
    cp -r "$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("deepspeed").submodule_search_locations[0])')" .ds/
    find .ds -name __pycache__ -prune -exec rm -rf {} +
    du -sh .whl .ds ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/.ds:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    shift
    # Larger budgets than the 5-minute default and batch 512 (the INT_MAX crash's): a lease's one run.
    timeout 540 python3 -m kpscale.bench --json "${OUT:-.}/gpu_bench.json" gpu --batches 32,128,256,512 \
      --budgets 200,90,30 "$@" ;;
  *)
    echo "usage: bash infra/gpu_bench.sh prepare | run [bench gpu arguments]" >&2
    exit 2 ;;
esac
