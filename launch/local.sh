#!/usr/bin/env bash
# Start N joyjax processes on this machine as one multi-process JAX job (a local stand-in for a multi-host run).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--] <joyjax train arguments...>

Starts N processes of `joyjax train` on this machine. Process i gets
  --config.mesh.coordinator=localhost:PORT --config.mesh.num_processes=N --config.mesh.process_id=i
so joyjax.parallel.initialize() joins them into one JAX job; every other argument is passed to `joyjax train`.
On CPU each process sees --devices-per-process host devices (XLA_FLAGS; the caller's other XLA flags pass
through); on GPU each gets its own CUDA_VISIBLE_DEVICES slice.

Options:
  -n, --num-processes N        processes to start (default 2)
  -d, --devices-per-process D  devices per process (default 4: CPU host devices, or GPUs per process)
  -p, --port PORT              coordinator port on localhost (default 12321)
      --platform cpu|gpu       device platform (default cpu)
      --log-dir DIR            write each process's output to DIR/process_<i>.log (default: prefixed stdout)
      --dry-run                print the commands instead of running them
  -h, --help                   this help

Environment: JOYJAX_CMD overrides the program (default: `joyjax`, else `python -m joyjax.cli`).

Example:
  launch/local.sh -n 2 -d 4 --config configs/tiny.py --config.mesh.data=2 --config.train.steps=20
EOF
}

num=2
per=4
port=12321
platform=cpu
log_dir=""
dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="$2"; shift 2 ;;
    --num-processes=*) num="${1#*=}"; shift ;;
    -d|--devices-per-process) per="$2"; shift 2 ;;
    --devices-per-process=*) per="${1#*=}"; shift ;;
    -p|--port) port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --platform) platform="$2"; shift 2 ;;
    --platform=*) platform="${1#*=}"; shift ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

die() { echo "launch/local.sh: $*" >&2; exit 2; }
[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$num'"
[[ "$per" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$per'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
[[ "$platform" == cpu || "$platform" == gpu ]] || die "--platform must be cpu or gpu, got '$platform'"
for a in "${args[@]+"${args[@]}"}"; do
  case "$a" in
    --config.mesh.coordinator=*|--config.mesh.num_processes=*|--config.mesh.process_id=*)
      die "$a is set by the launcher; drop it" ;;
  esac
done

if [[ -n "${JOYJAX_CMD:-}" ]]; then
  read -r -a prog <<<"$JOYJAX_CMD"
elif command -v joyjax >/dev/null 2>&1; then
  prog=(joyjax)
else
  prog=(python -m joyjax.cli)
fi

command_for() {  # the environment and argv of process $1, as words
  local i="$1"
  cmd=(env)
  if [[ "$platform" == cpu ]]; then
    # The caller's other XLA flags are kept; only the host device count is the launcher's.
    local xla=() f
    read -r -a xla <<<"${XLA_FLAGS:-}"
    local flags=""
    for f in "${xla[@]+"${xla[@]}"}"; do
      [[ "$f" == --xla_force_host_platform_device_count=* ]] || flags+="$f "
    done
    cmd+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${flags}--xla_force_host_platform_device_count=$per")
  else
    local first=$((i * per)) ids="" k
    for ((k = first; k < first + per; k++)); do ids+="${ids:+,}$k"; done
    cmd+=("CUDA_VISIBLE_DEVICES=$ids")
  fi
  cmd+=("${prog[@]}" train "${args[@]+"${args[@]}"}"
        "--config.mesh.coordinator=localhost:$port" "--config.mesh.num_processes=$num"
        "--config.mesh.process_id=$i")
}

q() {  # shell-quote one word, readably: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < num; i++)); do
    command_for "$i"
    for w in "${cmd[@]}"; do q "$w"; printf ' '; done
    if [[ -n "$log_dir" ]]; then printf '> %s 2>&1 &\n' "$(q "$log_dir/process_$i.log")"; else printf '&\n'; fi
  done
  echo "wait"
  exit 0
fi

[[ -n "$log_dir" ]] && mkdir -p "$log_dir"
pids=()
cleanup() {
  local p
  for p in "${pids[@]+"${pids[@]}"}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup INT TERM
for ((i = 0; i < num; i++)); do
  command_for "$i"
  if [[ -n "$log_dir" ]]; then
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  fi
  pids+=("$!")
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "launch/local.sh: process $i failed; stopping the others" >&2
    status=1
    cleanup
  fi
done
exit "$status"
