#!/bin/bash
# The 2-GPU measurements of benchmarks/RESULTS.md ("Two GPUs"): run on a host with 2 GPUs, in the repository root.
#   bash benchmarks/sharded_2gpu.sh dit       # DiT full fine-tuning on 2 GPUs: 1 process, 2 processes
#   bash benchmarks/sharded_2gpu.sh dit_lora  # DiT LoRA: 1 GPU vs 2 GPUs
#   bash benchmarks/sharded_2gpu.sh ar1       # AR (real size) LoRA on 1 GPU
#   bash benchmarks/sharded_2gpu.sh ar1_tune  # AR LoRA on 1 GPU: remat dots / full x micro-batch 1-8
#   bash benchmarks/sharded_2gpu.sh ar        # AR (real size) LoRA on 2 GPUs: 1 process, 2 processes
#   bash benchmarks/sharded_2gpu.sh full141   # 141 GB GPUs (H200): DiT full on 1 GPU, AR full on 2 GPUs
# Each run is its own process (fresh GPU memory); logs and JSON go to $OUT.
set -u
source "$(dirname "$0")/run_logged.sh"
tagged() { local tag=$1; run "$@" --tag "$tag"; }   # tagged TAG LIMIT_S COMMAND...: the command gets --tag TAG
L="python -m glm_jax.launch --nproc 2 --module benchmarks.sharded_gpu --"
case "${1:-dit}" in
dit)
    tagged dit_full_fsdp2_1proc 270 python -m benchmarks.sharded_gpu --part dit --remat dots
    tagged dit_full_fsdp2_2proc 270 $L --part dit --remat dots
    ;;
dit_lora)    # the same 1 sample per device
    CUDA_VISIBLE_DEVICES=0 tagged dit_lora64_1gpu 200 python -m benchmarks.sharded_gpu --part dit --lora 64 --remat dots
    tagged dit_lora64_fsdp2_1proc 200 python -m benchmarks.sharded_gpu --part dit --lora 64 --remat dots
    ;;
ar1)
    CUDA_VISIBLE_DEVICES=0 tagged ar_lora64_1gpu 280 python -m benchmarks.sharded_gpu --part ar --lora 64 --batch-per-device 8 --micro 2
    ;;
ar1_tune)    # AR LoRA on 1 GPU, 8 sequences per step: remat policy x micro-batch; ATTN=xla for XLA's attention
    for rm in "dots 1" "full 2" "full 4" "full 8"; do
        set -- $rm
        CUDA_VISIBLE_DEVICES=0 tagged ar_lora64_1gpu_${ATTN:+${ATTN}_}$1_m$2 170 python -m benchmarks.sharded_gpu --part ar --lora 64 \
            --batch-per-device 8 --micro $2 --remat $1 --attention "${ATTN:-}"
    done
    ;;
ar)          # the same 8 sequences per device, 2 per micro-batch per device
    tagged ar_lora64_fsdp2_1proc 280 python -m benchmarks.sharded_gpu --part ar --lora 64 --batch-per-device 8 --micro 4
    tagged ar_lora64_fsdp2_2proc 280 $L --part ar --lora 64 --batch-per-device 8 --micro 4
    ;;
full141)     # full fine-tuning where 80 GB GPUs do not hold it
    CUDA_VISIBLE_DEVICES=0 tagged dit_full_1gpu 250 python -m benchmarks.sharded_gpu --part dit --remat dots
    tagged ar_full_fsdp2_1proc 320 python -m benchmarks.sharded_gpu --part ar --batch-per-device 8 --micro 4
    ;;
esac
