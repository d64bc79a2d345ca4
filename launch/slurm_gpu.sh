#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch with the allocation taken from variables (run from the repository root).
#
#   NODES=2 GPUS_PER_NODE=8 PARTITION=<p> ACCOUNT=<a> TIME=24:00:00 VENV=$PWD/.venv STAGE=vqgan \
#   CONFIG=configs/vqgan_imagenet_f16_1024.py WORKDIR=<shared dir> launch/slurm_gpu.sh --config.mesh.fsdp=8
#
# Arguments: extra flags for the entry point. Variables (environment):
#   NODES           number of nodes (default 1)
#   GPUS_PER_NODE   GPUs per node = processes per node (required)
#   PARTITION       sbatch --partition (default: the site's default)
#   ACCOUNT         sbatch --account (default: none)
#   TIME            sbatch --time limit, e.g. 24:00:00 (default: the partition's)
#   CPUS_PER_TASK   sbatch --cpus-per-task (default: none; data loading wants a few per GPU)
#   GPU_REQUEST     how GPUs are requested: gres (--gres=gpu:N, default) or gpus (--gpus-per-node=N)
#   JOB_NAME        sbatch --job-name (default taming-jax)
#   SBATCH_FLAGS    any other sbatch flags (e.g. "--qos=high --mem=0 --exclusive")
#   DRY_RUN         1: print the sbatch command instead of submitting
#   and everything launch/slurm_gpu.sbatch reads: STAGE, CONFIG, WORKDIR, DATA_DIR, FIRST_STAGE, VENV,
#   REPO_DIR, MULTIHOST, SRUN_FLAGS (the environment is exported to the job).
set -euo pipefail

die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -n "${GPUS_PER_NODE:-}" ]] || die "GPUS_PER_NODE is not set (see the variables at the top of $0)"
for v in STAGE CONFIG WORKDIR; do
    [[ -n "${!v:-}" ]] || die "$v is not set (see launch/slurm_gpu.sbatch)"
done
export STAGE CONFIG WORKDIR GPUS_PER_NODE
export REPO_DIR="${REPO_DIR:-$(dirname "$here")}"

args=(--nodes="${NODES:-1}" --ntasks-per-node="$GPUS_PER_NODE" --job-name="${JOB_NAME:-taming-jax}" --export=ALL)
case "${GPU_REQUEST:-gres}" in
    gres) args+=(--gres="gpu:$GPUS_PER_NODE") ;;
    gpus) args+=(--gpus-per-node="$GPUS_PER_NODE") ;;
    *) die "GPU_REQUEST must be gres or gpus, got '$GPU_REQUEST'" ;;
esac
[[ -n "${PARTITION:-}" ]] && args+=(--partition="$PARTITION")
[[ -n "${ACCOUNT:-}" ]] && args+=(--account="$ACCOUNT")
[[ -n "${TIME:-}" ]] && args+=(--time="$TIME")
[[ -n "${CPUS_PER_TASK:-}" ]] && args+=(--cpus-per-task="$CPUS_PER_TASK")
# shellcheck disable=SC2206  # SBATCH_FLAGS is a list of flags
[[ -n "${SBATCH_FLAGS:-}" ]] && args+=(${SBATCH_FLAGS})

cmd=(sbatch "${args[@]}" "$here/slurm_gpu.sbatch" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
else
    "${cmd[@]}"
fi
