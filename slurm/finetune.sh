#!/bin/bash
# Fine-tune on a downstream task on Slurm: MEGAVL_TASK picks configs/finetune_${MEGAVL_TASK}.yaml
# (retrieval | vqa | nlvr2); MEGAVL_INIT is the pre-trained megavl-export dir (or a checkpoint dir,
# with MEGAVL_TRUST_CHECKPOINT=1: its DeepSpeed files are pickles).
# 1 node x 8 GPUs, requeued with a checkpoint before each time limit, exactly as pre-training.
#
#   MEGAVL_TASK=vqa MEGAVL_INIT=runs/4m/export sbatch slurm/finetune.sh
#   MEGAVL_TASK=retrieval MEGAVL_INIT=runs/4m/export MEGAVL_GPU_TYPE=a100 sbatch --nodes=2 slurm/finetune.sh
#
# Everything else (GPU type, output dir, extra --set overrides, NCCL) is read by slurm/common.sh;
# its header lists the variables. The #SBATCH lines are defaults; sbatch flags override them.
#
#SBATCH --job-name=megavl-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

: "${MEGAVL_TASK:?set MEGAVL_TASK to retrieval, vqa or nlvr2}"
case "$MEGAVL_TASK" in
  retrieval|vqa|nlvr2) ;;
  *) echo "megavl-slurm: error: MEGAVL_TASK=$MEGAVL_TASK is not retrieval, vqa or nlvr2" >&2; exit 2 ;;
esac
MEGAVL_RECIPE=${MEGAVL_RECIPE:-configs/finetune_${MEGAVL_TASK}.yaml}
if [[ -n "${MEGAVL_INIT:-}" ]]; then
  MEGAVL_EXTRA_SETS="task.init_from=${MEGAVL_INIT} ${MEGAVL_EXTRA_SETS:-}"
fi
source "${MEGAVL_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
