#!/usr/bin/env bash
# Write and submit a SLURM batch job: N nodes x G GPUs, one joyjax process per node (srun), coordinator from SLURM.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --nodes N [options] [--] <joyjax train arguments...>

Writes an sbatch script (one task per node, all GPUs of the node visible to it) and submits it with sbatch.
Inside the job, srun starts `joyjax train <arguments>` once per node; joyjax.parallel.initialize() sees
SLURM_NTASKS / SLURM_PROCID and takes the coordinator from JOYJAX_COORDINATOR, which the script sets to the
first node of the allocation at --port. Give the mesh with --config.mesh.* (e.g. --config.mesh.dcn_data=N to
keep the inter-node axis to data parallelism).

Options:
  -N, --nodes N            nodes (required)
  -g, --gpus-per-node G    GPUs per node (default 8)
      --cpus-per-task C    CPUs per task (default: SLURM's)
  -p, --partition P        partition
  -A, --account A          account
  -t, --time T             time limit, e.g. 24:00:00
  -J, --job-name NAME      job name (default joyjax)
      --port PORT          coordinator port on the first node (default 12321)
      --workdir DIR        directory the job runs in (default: the repository root)
      --venv DIR           activate DIR/bin/activate before starting
      --env KEY=VALUE      export in the job (repeatable), e.g. --env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
      --sbatch-arg ARG     extra #SBATCH line (repeatable), e.g. --sbatch-arg=--qos=high
      --script FILE        where to write the batch script (default WORKDIR/runs/slurm/JOBNAME.sbatch)
      --dry-run            print the batch script and the sbatch command instead of writing / submitting
  -h, --help               this help

Environment: JOYJAX_CMD overrides the program run by srun (default `joyjax`).

Example:
  launch/gpu_slurm.sh -N 4 -p gpu -t 12:00:00 --config configs/joyai_flash.py \
    --config.mesh.dcn_data=4 --config.mesh.fsdp=8 --config.train.output_dir=/shared/runs/flash
EOF
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nodes=""
gpus=8
cpus=""
partition=""
account=""
time_limit=""
job_name="joyjax"
port=12321
workdir="$repo"
venv=""
script=""
dry_run=0
envs=()
extra=()
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -N|--nodes) nodes="$2"; shift 2 ;;
    --nodes=*) nodes="${1#*=}"; shift ;;
    -g|--gpus-per-node) gpus="$2"; shift 2 ;;
    --gpus-per-node=*) gpus="${1#*=}"; shift ;;
    --cpus-per-task) cpus="$2"; shift 2 ;;
    --cpus-per-task=*) cpus="${1#*=}"; shift ;;
    -p|--partition) partition="$2"; shift 2 ;;
    --partition=*) partition="${1#*=}"; shift ;;
    -A|--account) account="$2"; shift 2 ;;
    --account=*) account="${1#*=}"; shift ;;
    -t|--time) time_limit="$2"; shift 2 ;;
    --time=*) time_limit="${1#*=}"; shift ;;
    -J|--job-name) job_name="$2"; shift 2 ;;
    --job-name=*) job_name="${1#*=}"; shift ;;
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --workdir) workdir="$2"; shift 2 ;;
    --workdir=*) workdir="${1#*=}"; shift ;;
    --venv) venv="$2"; shift 2 ;;
    --venv=*) venv="${1#*=}"; shift ;;
    --env) envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --sbatch-arg) extra+=("$2"); shift 2 ;;
    --sbatch-arg=*) extra+=("${1#*=}"); shift ;;
    --script) script="$2"; shift 2 ;;
    --script=*) script="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

die() { echo "launch/gpu_slurm.sh: $*" >&2; exit 2; }
[[ -n "$nodes" ]] || die "--nodes N is required (see --help)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$gpus'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
[[ "$job_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job-name may use letters, digits, . _ - only"
for e in "${envs[@]+"${envs[@]}"}"; do
  [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$e'"
done
for a in "${args[@]+"${args[@]}"}"; do
  case "$a" in
    --config.mesh.num_processes=*|--config.mesh.process_id=*)
      die "$a comes from SLURM (SLURM_NTASKS / SLURM_PROCID); drop it" ;;
  esac
done
[[ -n "$script" ]] || script="$workdir/runs/slurm/$job_name.sbatch"
read -r -a prog <<<"${JOYJAX_CMD:-joyjax}"

q() {  # shell-quote one word, readably: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
train_cmd() {
  local out="" w
  for w in "${prog[@]}" train "${args[@]+"${args[@]}"}"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

batch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$gpus"
  echo "#SBATCH --exclusive"
  [[ -n "$cpus" ]] && echo "#SBATCH --cpus-per-task=$cpus"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=$partition"
  [[ -n "$account" ]] && echo "#SBATCH --account=$account"
  [[ -n "$time_limit" ]] && echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$workdir/runs/slurm/%x-%j.out"
  for x in "${extra[@]+"${extra[@]}"}"; do echo "#SBATCH $x"; done
  echo "set -euo pipefail"
  echo "cd $(q "$workdir")"
  [[ -n "$venv" ]] && echo "source $(q "$venv/bin/activate")"
  for e in "${envs[@]+"${envs[@]}"}"; do echo "export ${e%%=*}=$(q "${e#*=}")"; done
  echo "head_node=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)"
  echo "export JOYJAX_COORDINATOR=\"\$head_node:$port\""
  echo "echo \"joyjax: \$SLURM_NNODES nodes x $gpus GPUs, coordinator \$JOYJAX_COORDINATOR\""
  echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 $(train_cmd)"
}

if [[ "$dry_run" == 1 ]]; then
  echo "# batch script that would be written to $script:"
  batch_script
  echo "# then:"
  echo "sbatch $(q "$script")"
  exit 0
fi

command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$(dirname "$script")" "$workdir/runs/slurm"
batch_script >"$script"
echo "wrote $script"
sbatch "$script"
