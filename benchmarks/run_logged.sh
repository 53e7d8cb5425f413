# Sourced by the multi-GPU drivers (sharded_2gpu.sh, scaling_gpus.sh): `run TAG LIMIT_S COMMAND...` runs the
# command under a time limit with its output in $OUT/log_TAG.txt, then prints its exit code and last log lines.
OUT=${OUT:-out}
mkdir -p "$OUT"
run() {
    local tag=$1 limit=$2; shift 2
    echo "=== $tag: $*"
    timeout "$limit" "$@" > "$OUT/log_$tag.txt" 2>&1
    echo "rc=$? $(grep -E '^\[' "$OUT/log_$tag.txt" | tail -3 | tr '\n' ' ')"
}
