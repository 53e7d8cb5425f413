#!/bin/bash
# The multi-GPU scaling runs of benchmarks/RESULTS.md, on one host with N GPUs (N = 4 or 8; default: every visible
# GPU, or the first NGPU=N of them), in the repository root. Each run is its own process group (fresh GPU memory);
# logs and JSON go to $OUT. Stages (pass one or more):
#   full      full fine-tuning updates of the real-size DiT and AR with FSDP over the N GPUs: step, memory, MFU
#   weak      weak scaling of the whole DiT GRPO iteration on 1, 2, 4, ... N GPUs (the same work per GPU)
#   weak_small  only the sizes below N, all at once on disjoint GPUs (1 + 2 + ... + N/2 = N - 1 GPUs), plus a
#             second 1-GPU run on the GPU left over: a card-to-card repeat
#   weak_n    only the N-GPU size
#   procs     the N-GPU iteration as N/2 processes x 2 GPUs; the tiny trainer on 1 x N and N/2 x 2 processes, and
#             an N/2 x 2 -> 2 x N/2 resume (N = 4: 2 x 2 -> 4 x 1)
# `weak` = `weak_small weak_n`. Running the small sizes side by side shares the host's CPUs between them (each
# has its own GPUs); run them one by one with SERIAL=1.
set -u
source "$(dirname "$0")/run_logged.sh"
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then VIS=(${CUDA_VISIBLE_DEVICES//,/ }); else VIS=($(seq 0 $(($(nvidia-smi -L | wc -l) - 1)))); fi
N=${NGPU:-${#VIS[@]}}
H=$((N / 2))
gpus() { local IFS=,; echo "${VIS[*]:$1:$2}"; }   # gpus FIRST COUNT: the visible GPUs FIRST .. FIRST+COUNT-1
export CUDA_VISIBLE_DEVICES=$(gpus 0 "$N")      # the first N visible GPUs
weak_small() {
    local first=0 n=1 pids=()
    weak_on() {   # weak_on FIRST COUNT TAG: one weak-scaling run on those GPUs, in the background unless SERIAL=1
        if [ "${SERIAL:-0}" = 1 ]; then
            CUDA_VISIBLE_DEVICES=$(gpus $1 $2) run $3 500 python -m benchmarks.scaling_gpu --tag $3
        else
            CUDA_VISIBLE_DEVICES=$(gpus $1 $2) run $3 500 python -m benchmarks.scaling_gpu --tag $3 &
            pids+=($!)
        fi
    }
    while [ $n -lt "$N" ]; do
        weak_on $first $n weak_$n
        first=$((first + n)); n=$((n * 2))
    done
    [ "${SERIAL:-0}" != 1 ] && [ $first -lt "$N" ] && weak_on $first 1 weak_1b
    [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
}
for stage in "$@"; do
case "$stage" in
full)
    run dit_full_fsdp$N 400 python -m benchmarks.sharded_gpu --part dit --remat dots --tag dit_full_fsdp$N
    run ar_full_fsdp$N 500 python -m benchmarks.sharded_gpu --part ar --lora 0 --remat dots --batch-per-device 2 \
        --micro $N --tag ar_full_fsdp$N
    ;;
weak) weak_small
    run weak_$N 500 python -m benchmarks.scaling_gpu --tag weak_$N ;;
weak_small) weak_small ;;
weak_n) run weak_$N 500 python -m benchmarks.scaling_gpu --tag weak_$N ;;
procs)
    run weak_${N}_${H}x2 500 python -m glm_jax.launch --nproc $H --gpus-per-process 2 --module benchmarks.scaling_gpu \
        -- --tag weak_${N}_${H}x2
    if [ $H -eq 2 ]; then to=4x1; else to=2x$H; fi
    run layouts 500 python -m benchmarks.process_layouts --layouts 1x$N,${H}x2 --resume ${H}x2:$to
    ;;
*) echo "unknown stage $stage (full, weak, weak_small, weak_n, procs)"; exit 2 ;;
esac
done
