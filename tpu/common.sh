#!/usr/bin/env bash
# Shared settings and helpers of the TPU pod scripts; every script sources this file and calls
# parse_args "$@" first. Settings are environment variables:
#   TPU_NAME          (required) the pod slice's name, e.g. rlhf-v5e-16
#   ZONE              (required) e.g. us-west4-a (v5e), us-east5-a (v5p)
#   PROJECT           the Google Cloud project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  v5litepod-16 (default), v5p-64, v6e-16, v4-32, ...
#   RUNTIME_VERSION   the TPU VM image (default: the one Cloud TPU lists for the accelerator's
#                     generation: v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e, tpu-ubuntu2204-base)
#   REPO_DIR          the checkout's directory on each worker, under ~ (default rlhf_jax)
#   PYTHON_VERSION    the Python setup.sh installs where the image's python3 is older than 3.11 (default 3.12)
#   DRY_RUN=1         the same as --dry-run: print the commands (one per line, shell-quoted) instead of
#                     running them; notes go to stderr
# shellcheck disable=SC2034  # REPO_ROOT, RUN_MATCH, OPTS, ARGS: used by the scripts that source this
set -euo pipefail

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TPU_DIR/.." && pwd)
DRY_RUN=${DRY_RUN:-0}
: "${ACCELERATOR_TYPE:=v5litepod-16}"
: "${REPO_DIR:=rlhf_jax}"
: "${PYTHON_VERSION:=3.12}"
case $ACCELERATOR_TYPE in
  v6e-*) _runtime=v2-alpha-tpuv6e ;;
  v5p-*) _runtime=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) _runtime=v2-alpha-tpuv5-lite ;;
  *) _runtime=tpu-ubuntu2204-base ;;
esac
: "${RUNTIME_VERSION:=$_runtime}"
# What a launched run looks like on a worker: the venv's python running rlhf_jax (a pgrep/pkill -f
# pattern for the worker's shell; anchored, so that it never matches the shell running it).
RUN_MATCH="\"^\$HOME/$REPO_DIR/.venv/bin/python3 -m rlhf_jax run\""

usage() {  # the calling script's header comment
  sed -n '2,/^[^#]/{/^# shellcheck/d;/^#/s/^# \{0,1\}//p;}' "$0"
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

note() {
  echo "$*" >&2
}

# parse_args "$@": takes the leading options: --dry-run (anywhere), -h/--help, and the script's own
# flags (collected in OPTS); ARGS holds the rest. Then checks the settings.
parse_args() {
  OPTS=()
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
      -*) OPTS+=("$1") ;;
      *) break ;;
    esac
    shift
  done
  # --dry-run after the arguments too (`tpu/copy.sh data --dry-run`): asked for, nothing may run.
  local arg
  ARGS=()
  for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then DRY_RUN=1; else ARGS+=("$arg"); fi
  done
  [ -n "${TPU_NAME:-}" ] || die "set TPU_NAME, e.g. export TPU_NAME=rlhf-v5e-16"
  [ -n "${ZONE:-}" ] || die "set ZONE, e.g. export ZONE=us-west4-a"
  [[ $REPO_DIR =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] \
    || die "REPO_DIR must be a plain relative path, got '$REPO_DIR'"
}

expect_no_args() {
  [ ${#OPTS[@]} -eq 0 ] || die "unknown option ${OPTS[0]}"
  [ ${#ARGS[@]} -eq 0 ] || die "unexpected argument ${ARGS[0]}"
}

# tracked_files: the checkout's tracked files that exist in the working tree, NUL-separated (what
# setup.sh ships).
tracked_files() {
  git -C "$REPO_ROOT" ls-files -z | while IFS= read -r -d '' f; do
    if [ -e "$REPO_ROOT/$f" ]; then printf '%s\0' "$f"; fi
  done
}

# code_id: one hash of those files' names and contents. setup.sh leaves it in ~/$REPO_DIR/.code_id on
# every worker once installed there; launch.sh launches only where it matches the checkout's.
code_id() {
  git -C "$REPO_ROOT" rev-parse 2> /dev/null || die "$REPO_ROOT is not a git checkout: setup.sh ships its tracked files"
  (cd "$REPO_ROOT" && { tracked_files | tr '\0' '\n'; tracked_files | tr '\0' '\n' | git hash-object --stdin-paths; } \
     | git hash-object --stdin)
}

# shell_quote ARG...: the arguments as one shell command line (single quotes where needed).
shell_quote() {
  local out="" arg flag safe='^[A-Za-z0-9_./:=@%+,-]+$' option='^--[A-Za-z0-9-]+=' q="'"
  for arg in "$@"; do
    flag=""
    if [[ $arg =~ $option ]]; then  # --flag='value', as one would type it
      flag=${BASH_REMATCH[0]}
      arg=${arg#"$flag"}
    fi
    if [[ $arg =~ $safe ]]; then
      out+=" $flag$arg"
    else
      out+=" $flag'${arg//$q/$q\\$q$q}'"
    fi
  done
  printf '%s' "${out# }"
}

# run COMMAND ARG...: run it, or print it under --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    shell_quote "$@"
    echo
  else
    "$@"
  fi
}

# tpu_vm SUBCOMMAND ARG...: `gcloud compute tpus tpu-vm` with this slice's zone and project.
tpu_vm() {
  local project=()
  [ -z "${PROJECT:-}" ] || project=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$@" --zone="$ZONE" ${project[@]+"${project[@]}"}
}

# on_workers WORKER COMMAND: run the shell command line COMMAND on WORKER (all, or 0, 1, ...).
on_workers() {
  tpu_vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}
