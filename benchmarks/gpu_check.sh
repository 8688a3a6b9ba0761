#!/usr/bin/env bash
# The checks that need a GPU: the Triton kernels against the reference, and their speed against
# cuDNN's 3x3 conv and the copy bandwidth. For a machine with a CUDA GPU where PyTorch and Triton are
# already installed (no install step: the package is used from src/). From the repository root:
#     bash benchmarks/gpu_check.sh [tests] [bench] [bench-fp32] [models] [sweep]   # default: tests bench
# Figures go to $OUT if set, else the current directory.
#   tests:      the CUDA tests: Triton forward+backward against the reference on the GPU (TF32 off and
#               on, the autotuned launch), the Triton operators (opcheck, torch.compile(fullgraph=True)
#               of a triton layer against eager, eval and training), CUDA post-processing;
#   bench:      the benchmark's layers and core sections on the GPU (PyTorch's default: TF32 on for
#               cuDNN's convs and the Triton dots): layer pairs incl. 8x256x65x129 against cuDNN's 3x3
#               conv, the attention core's fraction of copy bandwidth; the autotuner's choices;
#   bench-fp32: the same with TF32 off on both sides (cuDNN fp32 conv, 3xTF32 Triton dots);
#   models:     the models and post-processing sections;
#   sweep:      every tile configuration of the kernels at 8x256x65x129, one by one (times per config).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-.}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench)
python3 -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
failed=()
run_stage() {  # one stage; a failing stage does not stop the others
    local stage=$1
    case "$stage" in
        tests) python3 -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" tests/test_triton_kernels.py \
                   tests/test_triton_ops.py tests/test_postprocess.py ;;
        bench) python3 -m axial_deeplab benchmark --device cuda --only layers core --json "$out/benchmark_cuda.json" ;;
        bench-fp32) python3 -m axial_deeplab benchmark --device cuda --only layers core --no-tf32 \
                        --json "$out/benchmark_cuda_fp32.json" ;;
        models) python3 -m axial_deeplab benchmark --device cuda --only models postprocess \
                    --json "$out/benchmark_cuda_models.json" ;;
        sweep) python3 benchmarks/triton_tile_sweep.py --json "$out/triton_tile_sweep.json" ;;
        *) echo "unknown stage $stage (tests, bench, bench-fp32, models, sweep)"; return 2 ;;
    esac
}
for stage in "${stages[@]}"; do
    echo "=== $stage"
    run_stage "$stage" || failed+=("$stage")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED stages: ${failed[*]}"
    exit 1
fi
echo "all stages passed: ${stages[*]}"
