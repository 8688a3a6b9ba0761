#!/usr/bin/env bash
# The GPU checks of issue 6, for a machine with a CUDA GPU where PyTorch and Triton are already
# installed (no install step: the package is used from src/). From the repository root:
#     bash benchmarks/gpu_check.sh            # figures go to $OUT, else the current directory
# 1. the CUDA tests: Triton forward+backward against the reference on the GPU, CUDA post-processing;
# 2. the benchmark on the GPU: layer pairs incl. 8x256x65x129 against cuDNN's 3x3 conv, the
#    attention core's fraction of copy bandwidth, models, post-processing; saved as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_triton_kernels.py tests/test_postprocess.py
python3 -m axial_deeplab benchmark --device cuda --json "$out/benchmark_cuda.json"
