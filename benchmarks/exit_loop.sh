#!/usr/bin/env bash
# Repeats a short two-process CPU run (accelerate launch, gloo) N times and counts the runs that
# do not exit 0, and among them those aborted at exit ("terminate called without an active
# exception": a gloo thread needing the GIL while the interpreter finalized; see
# launcher/train.py). Each run: 1 epoch of digits, its own output folder and port.
#
#   benchmarks/exit_loop.sh [N (default 40)] [more itop-train flags]
#
# Prints one line per failed run (its log is kept) and a last line "exit loop: F/N failed (A aborted)".
set -u
cd "$(dirname "$0")/.."
n=${1:-40}
shift $(( $# > 0 ? 1 : 0 ))
py=${PYTHON:-.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/exit-loop-XXXX")
failed=0 aborted=0
for i in $(seq 1 "$n"); do
    port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 timeout 600 "$py" -m accelerate.commands.launch \
        --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        --main_process_port "$port" -m launcher.train --sparse --data digits --model digits-mlp \
        --density 0.05 --epochs 1 --update_frequency 2 --no-wandb --no-plots --no-progress \
        --output-dir "$work/run$i" "$@" > "$work/run$i.log" 2>&1
    rc=$?
    if [[ $rc != 0 ]]; then
        failed=$((failed + 1))
        grep -q "terminate called" "$work/run$i.log" && aborted=$((aborted + 1))
        echo "run $i: exit $rc, log $work/run$i.log"
    else
        rm -rf "$work/run$i" "$work/run$i.log"
    fi
done
echo "exit loop: $failed/$n failed ($aborted aborted)"
