#!/usr/bin/env bash
# The one launcher behind every sbatch script in slurm/: run by the script's single `srun` line,
# ONCE PER NODE (one task per node), it derives the whole distributed setup from SLURM's
# variables, here, inside the task:
#
#   machine rank    SLURM_PROCID of this task (= SLURM_NODEID with one task per node). Evaluated
#                   here, not in the batch shell: there it is 0 on every node (the classic mistake)
#   machines        the tasks of this step (SLURM_STEP_NUM_TASKS)
#   head node       the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"`, reached at
#                   its NodeAddr (`scontrol show node`)
#   processes/node  the GPUs allotted to this node (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES,
#                   else nvidia-smi); with ITOP_DEVICE=cpu, ITOP_PROCS_PER_NODE (default 1)
#   port            15000 + job id % 15000: every node computes the same one, and a requeued job
#                   (same id) meets again on it
#
# then runs `accelerate launch ... -m launcher.train --resume auto <recipe>` (the recipe: this
# script's arguments, itop-train flags). `--resume auto` continues the run folder's latest
# checkpoint, if any: a requeued job resumes where it stopped.
#
# Optional variables:
#   ITOP_ROOT            the repository (default: $SLURM_SUBMIT_DIR, where you ran sbatch)
#   ITOP_VENV            the virtual environment to activate (default: $ITOP_ROOT/.venv, if any)
#   ITOP_DEVICE          gpu (default) or cpu (gloo; ITOP_PROCS_PER_NODE processes per node)
#   ITOP_PROCS_PER_NODE  processes per node (default: the GPUs allotted; 1 with ITOP_DEVICE=cpu)
#   ITOP_PORT            the rendezvous port (default: derived from the job id)
#   ITOP_HEAD_ADDR       the head node's address (default: its NodeAddr)
#   ITOP_ENTRYPOINT      what every process runs (default: -m launcher.train; any script that
#                        takes itop-train flags)
#   ITOP_WANDB_PROBE     host:port tried once to decide whether W&B can be online (default: the
#                        host of WANDB_BASE_URL, else api.wandb.ai:443); unreachable: the run
#                        logs offline (`--wandb-mode offline`). `none` skips the probe. An explicit
#                        --wandb-mode or --no-wandb, or WANDB_MODE, always wins
#   ITOP_DRY_RUN=1       print what would run, run nothing. Outside a SLURM job too: then the
#                        job is described by options before the recipe,
#                          ITOP_DRY_RUN=1 slurm/launch.sh --nodes N --gpus-per-node G [--machine-rank R] [recipe]
#                        (defaults 1 node, this machine's GPUs, machine 0; job id 0; the head
#                        node is this host unless ITOP_HEAD_ADDR; ITOP_DEVICE=cpu with
#                        ITOP_PROCS_PER_NODE instead of --gpus-per-node for CPU nodes)
#
# Signals. SLURM's warning (`#SBATCH --signal=USR1@T`: every process of the step gets SIGUSR1
# T seconds before the time limit), SIGTERM (preemption, scancel, the time limit itself) and
# SIGINT (Ctrl-C twice on srun) must reach the training processes, which then all checkpoint at
# the same step boundary, exit 0, and after the warning requeue the job (launcher/preemption.py).
# accelerate's launcher (torchrun's agent) would die of SIGUSR1, and on SIGTERM or SIGINT send it
# on, SIGKILL its workers 30 s later and exit 1; it therefore runs with all three ignored
# (PET_SIGNALS_TO_HANDLE without SIGTERM and SIGINT) and waits for its workers, which install
# their own handlers. This script forwards USR1 and TERM to the workers as well, and SIGINT as
# SIGTERM (the same stop; a worker takes a second SIGINT as "abort now"), for sites whose
# process tracking signals only the task's process group (torchrun starts every worker in a
# session of its own). A USR1 or TERM received twice is the same request.
set -euo pipefail

die() { echo "slurm/launch.sh: error: $*" >&2; exit 2; }

# A dry run outside a job: the job it would be comes from --nodes/--gpus-per-node/--machine-rank.
OUTSIDE=0
if [[ -z "${SLURM_JOB_ID:-}" && "${ITOP_DRY_RUN:-0}" == 1 ]]; then
    OUTSIDE=1 nodes=1 gpus= rank=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nodes|--gpus-per-node|--machine-rank)
                [[ $# -ge 2 ]] || die "$1 needs a value"
                case "$1" in --nodes) nodes=$2 ;; --gpus-per-node) gpus=$2 ;; *) rank=$2 ;; esac
                shift 2 ;;
            --nodes=*) nodes=${1#*=}; shift ;;
            --gpus-per-node=*) gpus=${1#*=}; shift ;;
            --machine-rank=*) rank=${1#*=}; shift ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes $nodes: a positive number of nodes"
    [[ -z "$gpus" || "$gpus" =~ ^[0-9]+$ ]] || die "--gpus-per-node $gpus: a number of GPUs"
    [[ "$rank" =~ ^[0-9]+$ && "$rank" -lt "$nodes" ]] || die "--machine-rank $rank: from 0 to $((nodes - 1))"
    SLURM_JOB_ID=0 SLURM_PROCID=$rank SLURM_STEP_NUM_TASKS=$nodes
    [[ -z "$gpus" ]] || SLURM_GPUS_ON_NODE=$gpus
    echo "launch: dry run outside SLURM: as machine $rank of a $nodes-node job"
fi
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job; submit an sbatch script from slurm/ (or preview with ITOP_DRY_RUN=1 slurm/launch.sh --nodes N --gpus-per-node G)"
[[ "$OUTSIDE" == 1 || ( -n "${SLURM_STEP_ID:-}" && "${SLURM_STEP_ID}" != "batch" && "${SLURM_STEP_ID}" != "4294967294" ) ]] \
    || die "run me with srun, once per node: the machine rank must be evaluated inside each task"

ITOP_ROOT=${ITOP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ITOP_ROOT"
VENV=${ITOP_VENV:-$ITOP_ROOT/.venv}
if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi

# --- where am I: evaluated in this task -------------------------------------------------------
MACHINE_RANK=${SLURM_PROCID:?}
NUM_MACHINES=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:?}}
if [[ "$OUTSIDE" == 1 ]]; then  # no scontrol needed: this host is the head unless told
    ITOP_HEAD_ADDR=${ITOP_HEAD_ADDR:-${HOSTNAME:-localhost}}
    HEAD=$ITOP_HEAD_ADDR
else
    HEAD=$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n1)
fi
if [[ -z "${ITOP_HEAD_ADDR:-}" ]]; then
    ITOP_HEAD_ADDR=$(scontrol show node "$HEAD" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
    ITOP_HEAD_ADDR=${ITOP_HEAD_ADDR:-$HEAD}
fi
PORT=${ITOP_PORT:-$((15000 + SLURM_JOB_ID % 15000))}

count_gpus() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

DEVICE=${ITOP_DEVICE:-gpu}
case "$DEVICE" in
    cpu) PROCS=${ITOP_PROCS_PER_NODE:-1}
         export ACCELERATE_USE_CPU=true
         CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$PROCS}}
         export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / PROCS > 0 ? CPUS / PROCS : 1 ))} ;;
    gpu) PROCS=${ITOP_PROCS_PER_NODE:-$(count_gpus)}
         [[ "$PROCS" -ge 1 ]] || die "no GPU allotted on $(hostname): ask for them (--gpus-per-node) or set ITOP_DEVICE=cpu" ;;
    *) die "ITOP_DEVICE=$DEVICE: choose gpu or cpu" ;;
esac
TOTAL=$(( PROCS * NUM_MACHINES ))

# --- the recipe -------------------------------------------------------------------------------
recipe=("$@")
has_flag() { local f; for f in "${recipe[@]}"; do [[ "$f" == "$1" || "$f" == "$1"=* ]] && return 0; done; return 1; }
flag_value() {  # the value of the last occurrence of flag $1 in the recipe
    local i value=
    for ((i = 0; i < ${#recipe[@]}; i++)); do
        case "${recipe[i]}" in
            "$1") value=${recipe[i + 1]:-} ;;
            "$1"=*) value=${recipe[i]#*=} ;;
        esac
    done
    echo "$value"
}
extra=(--resume auto)  # before the recipe: an explicit --resume PATH wins on the first start ...
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
    recipe+=(--resume auto)  # ... but a requeued job continues its own latest checkpoint
fi

# W&B: nodes without internet log offline (synced after the job, see the end of this script).
if [[ -z "${WANDB_MODE:-}" ]] && ! has_flag --wandb-mode && ! has_flag --wandb_mode \
        && ! has_flag --no-wandb && ! has_flag --no_wandb; then
    probe=${ITOP_WANDB_PROBE:-}
    if [[ -z "$probe" ]]; then
        base=${WANDB_BASE_URL:-https://api.wandb.ai}
        hostport=${base#*://}; hostport=${hostport%%/*}
        if [[ "$hostport" == *:* ]]; then probe=$hostport
        elif [[ "$base" == http://* ]]; then probe=$hostport:80
        else probe=$hostport:443; fi
    fi
    if [[ "$probe" != none ]] && ! timeout 5 bash -c "exec 3<>/dev/tcp/${probe%:*}/${probe##*:}" 2>/dev/null; then
        echo "launch: ${probe} unreachable from $(hostname): W&B logs offline"
        extra+=(--wandb-mode offline)
    fi
fi

read -r -a ENTRY <<<"${ITOP_ENTRYPOINT:--m launcher.train}"
cmd=(accelerate launch --num_machines "$NUM_MACHINES" --num_processes "$TOTAL" --dynamo_backend no)
if [[ "$TOTAL" -gt 1 ]]; then
    cmd+=(--multi_gpu --machine_rank "$MACHINE_RANK" --main_process_ip "$ITOP_HEAD_ADDR"
          --main_process_port "$PORT" --rdzv_backend static)
fi
cmd+=("${ENTRY[@]}" "${extra[@]}" "${recipe[@]}")

echo "launch: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} task ${SLURM_PROCID} on" \
     "$(hostname) (node ${SLURMD_NODENAME:-?}): machine ${MACHINE_RANK}/${NUM_MACHINES}, head ${HEAD}" \
     "at ${ITOP_HEAD_ADDR}:${PORT}, ${PROCS} ${DEVICE} process(es) per node, ${TOTAL} in all"
if [[ "${ITOP_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi

# --- run, with the stop signals forwarded to the workers --------------------------------------
# torchrun's agent: leave SIGTERM and SIGINT to the workers (PET_*: torch.distributed.run's own)
export PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
(trap '' USR1 TERM INT; exec "${cmd[@]}") &
launcher=$!
forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM INT
status=0
while :; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break  # still running: wait was cut short by a signal
done

# --- the end of the job: how to upload an offline W&B run -------------------------------------
if [[ "$MACHINE_RANK" == 0 ]] && ! has_flag --no-wandb && ! has_flag --no_wandb; then
    run_dir=$(flag_value --output-dir)
    for alias in --output_dir --save-dir --save_dir; do
        run_dir=${run_dir:-$(flag_value "$alias")}
    done
    [[ -n "$run_dir" ]] || run_dir=$(python - "${recipe[@]}" <<'EOF' 2>/dev/null || true
import sys
from launcher.config import parse_config
print(parse_config(sys.argv[1:]).run_dir.resolve())
EOF
)
    if [[ -n "$run_dir" ]] && compgen -G "$run_dir/wandb/offline-run-*" >/dev/null; then
        echo "launch: W&B ran offline; from a machine with internet, upload it with:"
        echo "  wandb sync $run_dir/wandb/offline-run-*"
    fi
fi
exit "$status"
