# Shared body of slurm/pretrain_*.sh and slurm/finetune.sh: sourced by the batch script on the
# first node of the job.
# The thin scripts hold the #SBATCH lines and the recipe; this file launches the ranks, forwards
# the preemption signal, and requeues the job. The manual's Slurm page (docs/slurm.md) has the table.
#
# Settings read from the environment (sbatch exports the submitting shell's environment):
#   MEGAVL_ROOT           repo checkout to run from           default: the directory sbatch ran in
#   MEGAVL_PYTHON         python of the megavl venv           default: python on PATH
#   MEGAVL_RECIPE         YAML recipe                         set by the thin script
#   MEGAVL_GPU_TYPE       h100 | a100 | cpu: picks ds_config and the largest micro-batch that fits
#                           h100: ds_configs/zero2.json, <= 64 per GPU   (80 GB, ZeRO-2 is enough)
#                           a100: ds_configs/zero3.json, <= 32 per GPU   (40 GB parts: shard it all)
#                           cpu:  ds_configs/zero3.json, the recipe's micro-batch (tests, gloo)
#   MEGAVL_DS_CONFIG      DeepSpeed JSON                      default: by MEGAVL_GPU_TYPE
#   MEGAVL_MICRO_BATCH    cap on data.batch_size per rank     default: by MEGAVL_GPU_TYPE
#   MEGAVL_GLOBAL_BATCH   samples per optimizer step          default: the recipe's run.global_batch_size
#                         (kept fixed: micro-batch = min(cap, global / ranks), grad_accum makes up the rest)
#   MEGAVL_TRAIN_SHARDS   data.train_shards (pattern or [a, b]) default: the recipe's
#   MEGAVL_VAL_SHARDS     data.val_shards                     default: the recipe's
#   MEGAVL_OUTPUT_DIR     run.output_dir (checkpoints/, tb/)  default: the recipe's
#   MEGAVL_EXTRA_SETS     more `--set` overrides, "k=v k=v"   default: none
#   MEGAVL_TRUST_CHECKPOINT  1: pass --trust-checkpoint (a task.init_from checkpoint dir)  default: none
#   MEGAVL_MASTER_ADDR    rendezvous host                     default: first host of the job
#   MEGAVL_MASTER_PORT    rendezvous port                     default: 20000 + job id % 20000
#   MEGAVL_MAX_REQUEUES   stop requeueing after this many     default: 50
# Resources (nodes, GPUs, CPUs, time, partition) are sbatch flags, see the thin scripts.
#
# NCCL over InfiniBand is configured by exporting NCCL's own variables before sbatch; nothing is
# hard-coded because HCA names and interfaces differ per cluster. Common ones:
#   NCCL_IB_HCA=mlx5              which HCAs to use (`ibv_devices` lists them)
#   NCCL_SOCKET_IFNAME=ib0        interface for NCCL's bootstrap (and for gloo: GLOO_SOCKET_IFNAME)
#   NCCL_IB_GID_INDEX=3           RoCE clusters only
#   NCCL_DEBUG=INFO               prints the transport chosen (look for "NET/IB") once per rank
#   NCCL_IB_DISABLE=1             falls back to TCP sockets (debugging only: much slower)
#
# Rank layout: `srun` starts one task per GPU (--ntasks-per-node = GPUs per node), and each task
# gets torch's RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.
# We chose this over one `deepspeed --no_ssh --node_rank` launcher per node because srun forwards
# signals to every task itself (no launcher in between that may not pass SIGUSR1 on), Slurm sees
# and kills every rank, and there is no second per-node process tree to clean up on preemption.
#
# Preemption: `#SBATCH --signal=B:USR1@600` sends USR1 to this shell only, ten minutes before the
# time limit. The trap below passes it to srun, which forwards it to every rank; the ranks save a
# checkpoint and exit; then this shell requeues the job (`scontrol requeue`, needs --requeue), and
# the next run starts with `--resume auto`, i.e. from the newest checkpoint in
# <run.output_dir>/checkpoints/. SIGTERM (scancel, scheduler preemption, requeue) reaches every rank
# directly from Slurm; the shell traps it only to stay alive while the ranks save, and does not
# requeue itself then (a scheduler preemption requeues by Slurm's policy; scancel means stop).

set -uo pipefail

die() { echo "megavl-slurm: error: $*" >&2; exit 2; }
log() { echo "megavl-slurm: $*"; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "run this through sbatch (SLURM_JOB_ID is not set)"
: "${MEGAVL_RECIPE:?the thin script sets MEGAVL_RECIPE}"

MEGAVL_ROOT=${MEGAVL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$MEGAVL_ROOT" || die "MEGAVL_ROOT=$MEGAVL_ROOT is not a directory"
PY=${MEGAVL_PYTHON:-python}
command -v "$PY" >/dev/null || die "MEGAVL_PYTHON=$PY not found; activate the megavl venv or set it"
[[ -f "$MEGAVL_RECIPE" ]] || die "recipe $MEGAVL_RECIPE not found under $MEGAVL_ROOT"

# ------------------------------------------------------------------ GPU type -> ds_config, micro-batch
GPU_TYPE=${MEGAVL_GPU_TYPE:-h100}
case "$GPU_TYPE" in
    h100) default_ds=ds_configs/zero2.json; default_micro=64 ;;
    a100) default_ds=ds_configs/zero3.json; default_micro=32 ;;
    cpu)  default_ds=ds_configs/zero3.json; default_micro="" ;;
    *) die "MEGAVL_GPU_TYPE=$GPU_TYPE: expected h100, a100 or cpu" ;;
esac
DS_CONFIG=${MEGAVL_DS_CONFIG:-$default_ds}
[[ -f "$DS_CONFIG" ]] || die "ds_config $DS_CONFIG not found (MEGAVL_DS_CONFIG / MEGAVL_GPU_TYPE)"
MICRO_CAP=${MEGAVL_MICRO_BATCH:-$default_micro}
WORLD=${SLURM_NTASKS:?sbatch sets SLURM_NTASKS from --nodes x --ntasks-per-node}
# A job requeued onto another node count (scontrol update NumNodes=N) keeps the SLURM_NTASKS of its
# first allocation: the ranks follow the nodes it holds now (nodes x tasks per node, "8(x2)" -> 8).
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" && -n "${SLURM_JOB_NUM_NODES:-}" ]]; then
    per_node=${SLURM_NTASKS_PER_NODE%%[(,]*}
    WORLD=$(( SLURM_JOB_NUM_NODES * per_node ))
fi

SETS=()
if [[ -n "$MICRO_CAP" ]]; then
    GLOBAL=${MEGAVL_GLOBAL_BATCH:-$("$PY" -c 'import sys, yaml
print((yaml.safe_load(open(sys.argv[1])).get("run") or {}).get("global_batch_size", 0))' "$MEGAVL_RECIPE")} \
        || die "cannot read run.global_batch_size from $MEGAVL_RECIPE"
    if (( GLOBAL > 0 )); then
        (( GLOBAL % WORLD == 0 )) || die "global batch $GLOBAL is not divisible by $WORLD ranks"
        per_rank=$(( GLOBAL / WORLD ))
        micro=$(( MICRO_CAP < per_rank ? MICRO_CAP : per_rank ))
        while (( per_rank % micro != 0 )); do micro=$(( micro - 1 )); done   # largest divisor <= cap
        SETS+=("run.global_batch_size=$GLOBAL" "data.batch_size=$micro" "run.grad_accum=$(( per_rank / micro ))")
    else
        SETS+=("data.batch_size=$MICRO_CAP")
    fi
fi
[[ -n "${MEGAVL_TRAIN_SHARDS:-}" ]] && SETS+=("data.train_shards='$MEGAVL_TRAIN_SHARDS'")
[[ -n "${MEGAVL_VAL_SHARDS:-}" ]] && SETS+=("data.val_shards='$MEGAVL_VAL_SHARDS'")
[[ -n "${MEGAVL_OUTPUT_DIR:-}" ]] && SETS+=("run.output_dir='$MEGAVL_OUTPUT_DIR'")
[[ -n "${MEGAVL_EXTRA_SETS:-}" ]] && SETS+=("$MEGAVL_EXTRA_SETS")

# ------------------------------------------------------------------------------------- rendezvous
# Hostnames of the job resolve on a real cluster; MEGAVL_MASTER_ADDR covers those that do not.
export MASTER_ADDR=${MEGAVL_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MEGAVL_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

CMD=("$PY" megavl/train.py --ds_config "$DS_CONFIG" --config "$MEGAVL_RECIPE" --resume auto)
for s in "${SETS[@]}"; do CMD+=(--set "$s"); done
[[ "${MEGAVL_TRUST_CHECKPOINT:-}" == 1 ]] && CMD+=(--trust-checkpoint)

RESTARTS=${SLURM_RESTART_COUNT:-0}
log "job $SLURM_JOB_ID restart $RESTARTS on $SLURM_JOB_NODELIST: $WORLD ranks, gpu type $GPU_TYPE," \
    "master $MASTER_ADDR:$MASTER_PORT"
log "NCCL settings: $(env | grep -E '^NCCL_' | tr '\n' ' ')"
log "command: ${CMD[*]}"

# --------------------------------------------------------------------------- launch and signals
# 22.05's srun does not inherit --cpus-per-task from sbatch; pass it on so data workers get cores.
SRUN=(srun --kill-on-bad-exit=1 --label --export=ALL --ntasks="$WORLD")
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

GOT_SIGNAL=""
on_usr1() { GOT_SIGNAL=USR1; log "USR1: asking the ranks to checkpoint and exit"; kill -USR1 "$SRUN_PID" 2>/dev/null; }
on_term() { GOT_SIGNAL=${GOT_SIGNAL:-TERM}; log "TERM: waiting for the ranks to save and exit"; }
trap on_usr1 USR1
trap on_term TERM   # TERM only, not CONT as well: trapping both broke the TERM handler once

"${SRUN[@]}" bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
                      exec "$@"' megavl-rank "${CMD[@]}" &
SRUN_PID=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun exits.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"; rc=$?   # bash keeps the exit status of a reaped background job
log "ranks exited with $rc"

if [[ "$GOT_SIGNAL" == USR1 ]]; then
    if (( RESTARTS >= ${MEGAVL_MAX_REQUEUES:-50} )); then
        log "not requeueing: restart $RESTARTS reached MEGAVL_MAX_REQUEUES"
        exit "$rc"
    fi
    log "requeueing job $SLURM_JOB_ID; the next run resumes from the newest checkpoint"
    trap 'exit 0' TERM   # requeue itself sends TERM to this shell
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed (was the job submitted with --requeue?)"
    exit 0
fi
exit "$rc"
