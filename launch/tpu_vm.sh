#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) lifecycle for grpo_jax: create | setup | run | ssh | logs | delete.
# Every command is printed as "+ CMD" before it runs; --dry-run prints them and runs nothing.
set -euo pipefail

PROG=launch/tpu_vm.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=grpo_jax          # repo checkout on every worker, relative to the remote $HOME
LOG_DIR=grpo_jax_logs        # one <run>.log and <run>.pid per run on every worker, relative to $HOME
TARBALL=grpo_jax.tar.gz

usage() {
  cat <<EOF
usage: $PROG COMMAND [flags] [--dry-run]

commands:
  create                          create the TPU VM / pod slice
  setup                           copy HEAD (git archive) to every worker, create ~/$REMOTE_DIR/.venv,
                                  pip install -e ".[tpu]" there
  run EXPERIMENT [key=value ...]  start 'grpo-jax train experiments/EXPERIMENT [key=value ...] --run-dir DIR'
                                  on every worker in the background; log: ~/$LOG_DIR/<run>.log
  ssh [-- CMD ...]                open a shell on --worker (default 0), or run CMD there
  logs [RUN]                      follow ~/$LOG_DIR/RUN.log on --worker (default 0; RUN: the latest run)
  delete                          delete the TPU VM (asks first unless --yes or --dry-run)

flags (a flag wins over its environment variable):
  --name NAME              TPU VM name                               env TPU_NAME      (required)
  --zone ZONE              e.g. us-central2-b, us-west4-a            env TPU_ZONE      (required)
  --project PROJECT        GCP project                               env TPU_PROJECT   (default: gcloud config)
  --accelerator-type TYPE  e.g. v4-8, v4-16, v5litepod-8             env TPU_TYPE      (create)
  --version VERSION        runtime image                             env TPU_VERSION   (create; default: from
                           the accelerator type: v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot | --preemptible   cheaper capacity that can be reclaimed (create)
  --python VERSION         Python of the remote venv (via uv)         env TPU_PYTHON    (default 3.12)
  --run-dir DIR            gs://bucket/path or a path relative to ~/$REMOTE_DIR (run; default runs/EXPERIMENT)
  --worker N|all           worker for ssh and logs (default 0); setup and run always use all workers
  --yes                    delete without asking
  --dry-run                print the commands, run nothing
  -h, --help               this message
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }

# Quote one word for a POSIX shell: safe words stay bare, others are single-quoted ('\'' for a quote);
# --flag=VALUE quotes only VALUE.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^--[a-z-]+= ]]; then
    printf '%s' "${BASH_REMATCH[0]}"; quote "${1#*=}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s' "${out[*]}"
}

# Print a command exactly as it runs ("+ " marker; stdout in --dry-run, stderr otherwise); run it unless --dry-run.
step() {
  if [[ $dry_run == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# gcloud compute tpus tpu-vm VERB OPERAND... --zone=Z [--project=P] FLAG...
tpu_vm() {
  local verb=$1 operands=(); shift
  while [[ $# -gt 0 && $1 != -* ]]; do operands+=("$1"); shift; done
  step gcloud compute tpus tpu-vm "$verb" "${operands[@]}" "--zone=$zone" ${project:+"--project=$project"} "$@"
}

# The TPU software version Google documents for JAX on each generation ("TPU software versions").
runtime_for() {  # runtime_for ACCELERATOR_TYPE
  case $1 in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

need() {  # need VALUE FLAG ENV [hint]
  [[ -n $1 ]] || die "missing $2: pass $2 or set $3${4:+ ($4)}"
}

# ---- parse ------------------------------------------------------------------------------------------------
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
case $1 in -h|--help) usage; exit 0 ;; esac
cmd=$1; shift
case $cmd in create|setup|run|ssh|logs|delete) ;; *) die "unknown command '$cmd' (expected create|setup|run|ssh|logs|delete)" ;; esac

name=${TPU_NAME:-} zone=${TPU_ZONE:-} project=${TPU_PROJECT:-} accel=${TPU_TYPE:-} version=${TPU_VERSION:-}
python=${TPU_PYTHON:-3.12} capacity="" run_dir="" worker="" yes=0 dry_run=0
positional=() overrides=() remote_words=()

while [[ $# -gt 0 ]]; do
  arg=$1; shift
  if [[ $arg == --*=* ]]; then set -- "${arg#*=}" "$@"; arg=${arg%%=*}; fi   # --flag=value -> --flag value
  case $arg in
    --name|--zone|--project|--accelerator-type|--version|--python|--run-dir|--worker)
      [[ $# -gt 0 && $1 != -* ]] || die "$arg needs a value"
      case $arg in
        --name) name=$1 ;; --zone) zone=$1 ;; --project) project=$1 ;; --accelerator-type) accel=$1 ;;
        --version) version=$1 ;; --python) python=$1 ;; --run-dir) run_dir=$1 ;; --worker) worker=$1 ;;
      esac
      shift ;;
    --spot|--preemptible) [[ -z $capacity || $capacity == "$arg" ]] || die "pass only one of --spot and --preemptible"
      capacity=$arg ;;
    --yes|-y) yes=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) remote_words=("$@"); break ;;
    -*) die "unknown flag '$arg' (see $PROG --help)" ;;
    *=*) overrides+=("$arg") ;;
    *) positional+=("$arg") ;;
  esac
done

need "$name" --name TPU_NAME
need "$zone" --zone TPU_ZONE
[[ $cmd == run || ${#overrides[@]} -eq 0 ]] || die "key=value overrides only apply to 'run' (got ${overrides[0]})"
[[ $cmd == ssh || ${#remote_words[@]} -eq 0 ]] || die "'-- CMD' only applies to 'ssh'"
[[ $cmd == create || -z $capacity ]] || die "$capacity only applies to 'create'"
[[ $cmd == run || -z $run_dir ]] || die "--run-dir only applies to 'run'"
case $cmd in
  ssh|logs) worker=${worker:-0}
    [[ $worker =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker index (0, 1, ...) or 'all', got '$worker'" ;;
  *) [[ -z $worker ]] || die "--worker only applies to 'ssh' and 'logs' ($cmd uses every worker)" ;;
esac
max_positional=0
case $cmd in run|logs) max_positional=1 ;; esac
[[ ${#positional[@]} -le $max_positional ]] || die "unexpected argument '${positional[$max_positional]}' for '$cmd'"
if [[ $dry_run == 0 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
fi

# ---- commands ---------------------------------------------------------------------------------------------
case $cmd in
  create)
    need "$accel" --accelerator-type TPU_TYPE "e.g. v4-8, v5litepod-8"
    version=${version:-$(runtime_for "$accel")} || die "no default --version for accelerator type '$accel': pass \
--version (expected a type like v4-8, v5litepod-8, v5p-8 or v6e-8)"
    tpu_vm create "$name" "--accelerator-type=$accel" "--version=$version" ${capacity:+"$capacity"}
    ;;

  setup)
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain 2>/dev/null) ]]; then
      echo "$PROG: warning: uncommitted changes are not copied (setup ships git HEAD); commit them first" >&2
    fi
    local_tar=${TMPDIR:-/tmp}/grpo_jax-$name.tar.gz
    step git -C "$REPO_ROOT" archive --format=tar.gz -o "$local_tar" HEAD
    tpu_vm scp "$local_tar" "$name:$TARBALL" --worker=all
    # uv provides a Python >= 3.11 (TPU images ship 3.10); the venv is seeded with pip and kept across setups.
    install="set -euo pipefail; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/$TARBALL -C ~/$REMOTE_DIR; rm -f ~/$TARBALL"
    install+="; cd ~/$REMOTE_DIR"
    install+="; [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | env UV_UNMANAGED_INSTALL=\"\$HOME/.local/bin\" sh"
    install+="; [ -x .venv/bin/python ] || ~/.local/bin/uv venv --seed --python $(quote "$python") .venv"
    install+='; .venv/bin/python -m pip install -e ".[tpu]"'
    tpu_vm ssh "$name" --worker=all "--command=$install"
    ;;

  run)
    [[ ${#positional[@]} -eq 1 ]] || die "missing experiment: $PROG run EXPERIMENT [key=value ...] (a folder under experiments/)"
    experiment=${positional[0]%/}
    experiment=${experiment#experiments/}
    [[ -f $REPO_ROOT/experiments/$experiment/config.yaml ]] \
      || die "no experiments/$experiment/config.yaml in $REPO_ROOT (choose a folder under experiments/)"
    run_dir=${run_dir:-runs/$experiment}
    run=$(basename "$run_dir")
    # shellcheck disable=SC2088  # "~" must reach the remote shell unexpanded
    log="~/$LOG_DIR/$(quote "$run")"
    train=$(quote_all .venv/bin/grpo-jax train "experiments/$experiment" ${overrides[@]+"${overrides[@]}"} --run-dir "$run_dir")
    # setsid + nohup + redirected stdio: the trainer outlives the ssh session; $! is the trainer's pid.
    launch="set -euo pipefail; mkdir -p ~/$LOG_DIR; cd ~/$REMOTE_DIR"
    launch+="; PYTHONUNBUFFERED=1 nohup setsid $train > $log.log 2>&1 < /dev/null & echo \$! > $log.pid"
    launch+="; ln -sfn $(quote "$run.log") ~/$LOG_DIR/latest.log"
    launch+="; echo \"started on \$(hostname): pid \$(cat $log.pid), log $log.log\""
    tpu_vm ssh "$name" --worker=all "--command=$launch"
    ;;

  ssh)
    if [[ ${#remote_words[@]} -gt 0 ]]; then
      tpu_vm ssh "$name" "--worker=$worker" "--command=${remote_words[*]}"
    else
      tpu_vm ssh "$name" "--worker=$worker"
    fi
    ;;

  logs)
    # shellcheck disable=SC2088  # "~" must reach the remote shell unexpanded
    log="~/$LOG_DIR/$(quote "${positional[0]:-latest}.log")"
    tpu_vm ssh "$name" "--worker=$worker" "--command=tail -n 200 -F $log"
    ;;

  delete)
    if [[ $dry_run == 0 && $yes == 0 ]]; then
      read -r -p "Delete TPU VM '$name' in $zone? This cannot be undone. [y/N] " answer || answer=""
      [[ $answer == [yY]* ]] || { echo "aborted" >&2; exit 1; }
    fi
    tpu_vm delete "$name" --quiet
    ;;
esac
