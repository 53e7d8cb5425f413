#!/bin/bash
# The 8-GPU runs (benchmarks/RESULTS.md): run on one host with 8 GPUs, in the repository root. Each run is its own
# process group (fresh GPU memory); logs and JSON go to $OUT. Stages (pass one or more):
#   full     full fine-tuning updates of the real-size DiT and AR on 8 GPUs (FSDP): step, memory, MFU
#   weak     weak scaling of the whole DiT GRPO iteration on 1, 2, 4, 8 GPUs (same work per GPU)
#   procs    the same iteration as 4 processes x 2 GPUs; the tiny trainer on 1x8 / 4x2 and a 4x2 -> 2x4 resume
set -u
source "$(dirname "$0")/run_logged.sh"
for stage in "$@"; do
case "$stage" in
full)
    run dit_full_fsdp8 400 python -m benchmarks.sharded_gpu --part dit --remat dots --tag dit_full_fsdp8
    run ar_full_fsdp8 500 python -m benchmarks.sharded_gpu --part ar --lora 0 --remat dots --batch-per-device 2 --micro 8 --tag ar_full_fsdp8
    ;;
weak)
    for n in 1 2 4 8; do
        gpus=$(seq -s, 0 $((n - 1)))
        CUDA_VISIBLE_DEVICES=$gpus run weak_$n 500 python -m benchmarks.scaling_gpu --tag weak_$n
    done
    ;;
procs)
    run weak_8_4x2 500 python -m glm_jax.launch --nproc 4 --gpus-per-process 2 --module benchmarks.scaling_gpu -- --tag weak_8_4x2
    run layouts 500 python -m benchmarks.process_layouts --layouts 1x8,4x2 --resume 4x2:2x4
    ;;
esac
done
