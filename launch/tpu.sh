#!/usr/bin/env bash
# Create (or reuse) a Cloud TPU VM, install this checkout of joyjax on every worker, run `joyjax train` on all.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh --name NAME --zone ZONE [options] [--] <joyjax train arguments...>

1. Reuses the TPU VM NAME if `gcloud compute tpus tpu-vm describe` finds it, else creates it
   (--accelerator-type, --version).
2. Packs this checkout (without .git, runs/, caches), copies it to every worker (scp --worker=all) and
   pip-installs it there with the TPU extra (`pip install -e ~/joyjax[tpu]`).
3. Runs the same `joyjax train <arguments>` on all workers (ssh --worker=all). On a pod,
   joyjax.parallel.initialize() lets JAX find the other workers from the TPU metadata.

Options:
      --name NAME              TPU VM name (required)
      --zone ZONE              zone, e.g. us-east5-a (required)
      --project PROJECT        GCP project (default: gcloud's)
      --accelerator-type TYPE  for creation, e.g. v5p-64, v6e-16 (default v5litepod-8)
      --version VERSION        TPU runtime for creation (default tpu-ubuntu2204-base)
      --spot                   create a Spot VM
      --skip-install           do not copy / install (reuse what the workers have)
      --setup-only             create and install, do not train
      --remote-dir DIR         where the code goes on the workers (default joyjax, under the home directory)
      --dry-run                print the commands instead of running them
  -h, --help                   this help

Environment: JOYJAX_CMD overrides the program run on the workers (default `joyjax`).

Example:
  launch/tpu.sh --name flash --zone us-east5-a --accelerator-type v5p-64 -- \
    --config configs/joyai_flash.py --config.mesh.fsdp=16 --config.mesh.expert=4 \
    --config.train.output_dir=gs://my-bucket/runs/flash
EOF
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name=""
zone=""
project=""
accel="v5litepod-8"
version="tpu-ubuntu2204-base"
spot=0
install=1
train=1
remote_dir="joyjax"
dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --name=*) name="${1#*=}"; shift ;;
    --zone) zone="$2"; shift 2 ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project) project="$2"; shift 2 ;;
    --project=*) project="${1#*=}"; shift ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --accelerator-type=*) accel="${1#*=}"; shift ;;
    --version) version="$2"; shift 2 ;;
    --version=*) version="${1#*=}"; shift ;;
    --spot) spot=1; shift ;;
    --skip-install) install=0; shift ;;
    --setup-only) train=0; shift ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --remote-dir=*) remote_dir="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

die() { echo "launch/tpu.sh: $*" >&2; exit 2; }
[[ -n "$name" ]] || die "--name NAME is required (see --help)"
[[ -n "$zone" ]] || die "--zone ZONE is required (see --help)"
[[ "$remote_dir" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--remote-dir may use letters, digits, . _ / - only"
for a in "${args[@]+"${args[@]}"}"; do
  case "$a" in
    --config.mesh.coordinator=*|--config.mesh.num_processes=*|--config.mesh.process_id=*)
      die "$a: on a TPU pod JAX finds the workers itself; drop it" ;;
  esac
done

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -n "$project" ]] && where+=(--project "$project")

q() {  # shell-quote one word, readably: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() { local w out=""; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s\n' "$out"; }
run() {
  if [[ "$dry_run" == 1 ]]; then show "$@"; else "$@"; fi
}

# 1. create or reuse
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accel" --version "$version")
[[ "$spot" == 1 ]] && create+=(--spot)
if [[ "$dry_run" == 1 ]]; then
  echo "# reuse the TPU VM if it exists, else create it:"
  printf '%s || %s\n' "$(show "${gcloud_tpu[@]}" describe "$name" "${where[@]}")" "$(show "${create[@]}")"
elif "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $name in $zone"
else
  echo "creating TPU VM $name ($accel, $version) in $zone"
  "${create[@]}"
fi

# 2. copy and install on every worker
tarball="${TMPDIR:-/tmp}/joyjax-src-$name.tar.gz"
if [[ "$install" == 1 ]]; then
  [[ "$dry_run" == 1 ]] && echo "# pack this checkout, copy it to all workers, install it there:"
  run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude=.cache --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.venv --exclude=venv --exclude=.ci-venv --exclude=.whl .
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:joyjax-src.tar.gz" --worker=all "${where[@]}"
  setup="rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir && tar -xzf ~/joyjax-src.tar.gz -C ~/$remote_dir"
  setup+=" && python3 -m pip install -q -U pip && python3 -m pip install -q -e \"\$HOME/${remote_dir}[tpu]\""
  run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command "$setup"
fi

# 3. train on all workers
if [[ "$train" == 1 ]]; then
  read -r -a prog <<<"${JOYJAX_CMD:-joyjax}"
  train_cmd="$(show "${prog[@]}" train "${args[@]+"${args[@]}"}")"
  [[ "$dry_run" == 1 ]] && echo "# run on every worker:"
  run "${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command \
    "export PATH=\$HOME/.local/bin:\$PATH && cd ~/$remote_dir && $train_cmd"
fi
