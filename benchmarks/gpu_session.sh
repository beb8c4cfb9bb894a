#!/usr/bin/env bash
# One device call on a 2-GPU machine: DDP check (both GPUs), then whole-model throughput on GPU 0 while the
# shift-add and ERF benchmarks run on GPU 1. Logs and JSON land in $OUT (8 files at most come back).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__)"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 150 python3 benchmarks/ddp_check.py --gpus 2 > "$OUT/ddp.log" 2>&1; echo "ddp rc=$?"; tail -14 "$OUT/ddp.log"
  (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/shiftadd.py --quick > "$OUT/shiftadd.log" 2>&1
   CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/erf.py --out-dir /tmp/erf > "$OUT/erf.log" 2>&1
   cp /tmp/erf/erf_bench.json /tmp/erf/erf_combined.png "$OUT/" 2>/dev/null) &
fi
CUDA_VISIBLE_DEVICES=0 timeout "${MODELS_TIMEOUT:-330}" python3 benchmarks/models.py --warmup 3 --iters 10 \
  --models replknet_31b swin_base_patch4_window7_224 convnext_base shiftwise_v2_tiny unireplknet_t slak_tiny \
  convnext_tiny swin_tiny_patch4_window7_224 unireplknet_s slak_small > "$OUT/models.log" 2>&1
echo "models rc=$?"
wait
tail -16 "$OUT/models.log"; tail -30 "$OUT/shiftadd.log" 2>/dev/null; tail -6 "$OUT/erf.log" 2>/dev/null
