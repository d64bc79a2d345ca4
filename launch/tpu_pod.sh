#!/usr/bin/env bash
# Train either stage on a Cloud TPU VM slice (one host or a multi-host pod slice): the SAME entry point
# runs on every worker (gcloud ... ssh --worker=all) and starts jax.distributed itself (--multihost=on).
#
#   TPU_NAME=my-tpu ZONE=<zone> REPO_URL=<git url> STAGE=vqgan CONFIG=configs/vqgan_imagenet_f16_1024.py \
#   WORKDIR=gs://<bucket>/runs/vq DATA_DIR=gs://<bucket>/data launch/tpu_pod.sh --config.data.global_batch_size=256
#
# Arguments: extra flags for the entry point (e.g. --config.mesh.fsdp=8), appended after the ones below.
# Variables (environment):
#   ACTION             all (default: create if CREATE=1, setup, train) | create | setup | train | stop | delete
#   TPU_NAME           TPU VM name (required)
#   ZONE               its zone (required)
#   PROJECT            GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE   e.g. v4-32, v5litepod-16 (create only)
#   RUNTIME_VERSION    TPU VM software version (create only), e.g. tpu-ubuntu2204-base
#   CREATE             1: create the TPU VM first (ACTION=all); default 0 (use an existing one)
#   CREATE_FLAGS       extra flags for `gcloud compute tpus tpu-vm create` (e.g. "--spot")
#   REPO_URL           git URL of this repository, cloned on every worker (setup)
#   BRANCH             branch or tag to check out (default main)
#   REMOTE_DIR         checkout directory on the workers, relative to the login home (default taming-jax)
#   JAX_SPEC           pip requirement for JAX on TPU (default "jax[tpu]>=0.10.2,<0.11", setup.py's range)
#   STAGE              vqgan | transformer: launch.train_vqgan or launch.train_transformer (train)
#   CONFIG             config file, relative to the repository (train)
#   WORKDIR            run directory (train); must be the same shared directory on every worker
#   DATA_DIR           optional: --config.data.data_dir (shared, like WORKDIR)
#   FIRST_STAGE        optional: --config.first_stage.workdir (stage two)
#   MOUNT_ROOT         gs:// paths above are mounted with gcsfuse on every worker under this directory and
#                      passed as local paths (default: gcs under the login home); the entry points use local
#                      file APIs, and orbax writes one checkpoint from all hosts, so the path must be shared
#   DETACH             1: start training in the background on every worker (log: REMOTE_DIR/train.log) and
#                      return; default 0 (stream the output of all workers until training ends)
#   SSH_FLAGS          extra flags for `gcloud compute tpus tpu-vm ssh`
#   DRY_RUN            1: print the gcloud commands instead of running them
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
need() { for v in "$@"; do [[ -n "${!v:-}" ]] || die "$v is not set (see the variables at the top of $0)"; done; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage

ACTION="${ACTION:-all}"
BRANCH="${BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-taming-jax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10.2,<0.11}"
MOUNT_ROOT="${MOUNT_ROOT:-\$HOME/gcs}"
CREATE="${CREATE:-0}"
DETACH="${DETACH:-0}"
DRY_RUN="${DRY_RUN:-0}"
need TPU_NAME ZONE

gcloud_args=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

run() {  # print or execute a local command
    if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {  # one bash command line, run on every worker of the slice
    # shellcheck disable=SC2086  # SSH_FLAGS is a list of flags
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all ${SSH_FLAGS:-} \
        --command="$1"
}

MOUNTS=()
MAPPED=""
map_path() {  # MAPPED := a gs:// path as MOUNT_ROOT/<bucket>/<path> (bucket queued for mounting), else as is
    local p="$1" rest
    if [[ "$p" == gs://* ]]; then
        rest="${p#gs://}"
        [[ -n "${rest%%/*}" ]] || die "bad GCS path '$p'"
        MOUNTS+=("${rest%%/*}")
        MAPPED="$MOUNT_ROOT/$rest"
    else
        MAPPED="$p"
    fi
}

create() {
    need ACCELERATOR_TYPE RUNTIME_VERSION
    # shellcheck disable=SC2086  # CREATE_FLAGS is a list of flags
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_args[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${CREATE_FLAGS:-}
}

setup() {  # clone or update the repository on every worker, then a venv with the package and TPU JAX
    need REPO_URL
    local q_url q_branch q_dir q_jax
    q_url=$(printf '%q' "$REPO_URL"); q_branch=$(printf '%q' "$BRANCH")
    q_dir=$(printf '%q' "$REMOTE_DIR"); q_jax=$(printf '%q' "$JAX_SPEC")
    on_all_workers "set -e
if [ -d $q_dir/.git ]; then
  git -C $q_dir fetch --quiet origin $q_branch && git -C $q_dir checkout --quiet FETCH_HEAD
else
  git clone --quiet --branch $q_branch $q_url $q_dir
fi
cd $q_dir
python3 -m venv .venv && . .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet -e . $q_jax
echo \"worker \$(hostname): \$(git rev-parse --short HEAD), jax \$(python -c 'import jax; print(jax.__version__)')\""
}

mount_cmd() {  # gcsfuse mounts of the queued buckets (gcsfuse from Google's apt repository if missing)
    [[ ${#MOUNTS[@]} -gt 0 ]] || return 0
    echo "if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi"
    local b
    for b in $(printf '%s\n' "${MOUNTS[@]}" | sort -u); do
        echo "mkdir -p \"$MOUNT_ROOT/$b\" && (mountpoint -q \"$MOUNT_ROOT/$b\" || gcsfuse --implicit-dirs $b \"$MOUNT_ROOT/$b\")"
    done
}

train() {  # the entry point on every worker, same command line everywhere
    need STAGE CONFIG WORKDIR
    case "$STAGE" in vqgan|transformer) ;; *) die "STAGE must be vqgan or transformer, got '$STAGE'";; esac
    local flags=() arg cmd body q_dir
    map_path "$WORKDIR"; flags+=(--workdir="$MAPPED" --config="$CONFIG" --multihost=on)
    if [[ -n "${DATA_DIR:-}" ]]; then map_path "$DATA_DIR"; flags+=(--config.data.data_dir="$MAPPED"); fi
    if [[ -n "${FIRST_STAGE:-}" ]]; then map_path "$FIRST_STAGE"; flags+=(--config.first_stage.workdir="$MAPPED"); fi
    flags+=("$@")
    # Mapped paths keep $HOME for the worker to expand (double quotes); everything else is quoted literally.
    cmd="python -m launch.train_$STAGE"
    for arg in "${flags[@]}"; do
        if [[ "$arg" == *'$HOME'* ]]; then cmd+=" \"$arg\""; else cmd+=" $(printf '%q' "$arg")"; fi
    done
    q_dir=$(printf '%q' "$REMOTE_DIR")
    body="set -e
$(mount_cmd)
cd $q_dir && . .venv/bin/activate"
    if [[ "$DETACH" == 1 ]]; then
        body+="
nohup $cmd > train.log 2>&1 < /dev/null &
echo \"worker \$(hostname): started, log in $REMOTE_DIR/train.log\""
    else
        body+="
$cmd"
    fi
    on_all_workers "$body"
}

stop() {  # end the entry points on every worker (a leftover process keeps the TPU busy)
    on_all_workers "pkill -f 'python -m launch.train_' || true"
}

case "$ACTION" in
    all) if [[ "$CREATE" == 1 ]]; then create; fi; setup; train "$@" ;;
    create) create ;;
    setup) setup ;;
    train) train "$@" ;;
    stop) stop ;;
    delete) run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${gcloud_args[@]}" --quiet ;;
    *) die "ACTION must be all, create, setup, train, stop or delete, got '$ACTION'" ;;
esac
