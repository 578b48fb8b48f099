#!/bin/bash
# Pre-train the ViT-B/16 + BERT-base recipe configs/pretrain_4m.yaml (COCO + VG + SBU + CC3M) on Slurm:
# 2 nodes x 8 GPUs, one rank per GPU, requeued with a checkpoint before each time limit.
#
#   sbatch slurm/pretrain_4m.sh                                  # from the repo root, venv active
#   MEGAVL_GPU_TYPE=a100 sbatch --nodes=8 --partition=gpu slurm/pretrain_4m.sh
#
# The #SBATCH lines are defaults; override them on the sbatch command line (flags win over these
# lines) or, where sbatch has one, through its input variable: --nodes, --ntasks-per-node (= GPUs
# per node), --gpus-per-node (SBATCH_GPUS_PER_NODE), --cpus-per-task, --time (SBATCH_TIMELIMIT),
# --partition (SBATCH_PARTITION), --account (SBATCH_ACCOUNT), --constraint (SBATCH_CONSTRAINT),
# --signal (SBATCH_SIGNAL), --output (SBATCH_OUTPUT). Everything else (GPU type, data, output dir,
# recipe, NCCL) is an environment variable read by slurm/common.sh; its header lists them all.
#
#SBATCH --job-name=megavl-4m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# Slurm runs a copy of this file from its spool directory: find the repo through the submit dir.
MEGAVL_RECIPE=${MEGAVL_RECIPE:-configs/pretrain_4m.yaml}
source "${MEGAVL_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
