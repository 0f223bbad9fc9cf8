#!/usr/bin/env bash
# Copy files or directories of this checkout (data, model directories) to the same path under
# ~/$REPO_DIR on every worker, so that a config's relative paths (data.train, data.tokenizer,
# checkpoint.init_from) name the same files everywhere. Read-only inputs only: the run directory
# must be one directory all workers share (see the README, "Run on a TPU pod").
# Usage: TPU_NAME=... ZONE=... tpu/copy.sh [--dry-run] PATH...   e.g. tpu/copy.sh data/ultrafeedback_binarized
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
[ ${#OPTS[@]} -eq 0 ] || die "unknown option ${OPTS[0]}"
[ ${#ARGS[@]} -ge 1 ] || die "give the paths to copy (relative to $REPO_ROOT)"
paths=()
for path in "${ARGS[@]}"; do  # every path checked before anything is copied
  path=${path%/}
  [[ $path =~ ^[A-Za-z0-9_.@+,-]+(/[A-Za-z0-9_.@+,-]+)*$ ]] || die "$path: letters, digits and _.@+,- only"
  case $path in /* | .. | ../* | */../* | */..) die "$path: give a path inside the checkout, relative to it" ;; esac
  [ -e "$REPO_ROOT/$path" ] || die "$REPO_ROOT/$path does not exist"
  paths+=("$path")
done
for path in "${paths[@]}"; do
  # shellcheck disable=SC2088  # a path on the workers: their shell expands the ~
  dest="~/$REPO_DIR/$(dirname "$path")"; dest=${dest%/.}
  on_workers all "mkdir -p $dest"
  tpu_vm scp --recurse "$REPO_ROOT/$path" "$TPU_NAME:$dest/" --worker=all
done
