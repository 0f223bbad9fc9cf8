#!/usr/bin/env bash
# Copy this checkout to every worker and install it there: tpu/worker_setup.sh makes a Python >= 3.11
# virtual environment (~/$REPO_DIR/.venv) and runs `pip install -e '.[tpu]'` in it (jax[tpu] pins
# the libtpu that matches jax). The checkout's tracked files are copied as they are in the working
# tree (uncommitted edits included; `git add` a new file to ship it). Rerun after changing code:
# launch.sh refuses workers whose code is not the checkout's.
# Usage: TPU_NAME=... ZONE=... [PYTHON_VERSION=3.12] tpu/setup.sh [--dry-run]
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
expect_no_args
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION must look like 3.12, got '$PYTHON_VERSION'"
id=$(code_id)  # before packing: a file edited meanwhile makes the workers' id stale, never their code
if [ "$DRY_RUN" = 1 ]; then
  archive="\$TMPDIR/rlhf_jax.tar.gz"
  note "# would pack the tracked files of $REPO_ROOT into $archive"
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  archive="$tmp/rlhf_jax.tar.gz"
  (cd "$REPO_ROOT" && tracked_files | COPYFILE_DISABLE=1 tar --null -T - -czf "$archive")
fi
tpu_vm scp "$archive" "$TPU_NAME:~/rlhf_jax.tar.gz" --worker=all
remote="mkdir -p ~/$REPO_DIR && tar -xzf ~/rlhf_jax.tar.gz -C ~/$REPO_DIR && rm ~/rlhf_jax.tar.gz"
remote+=" && PYTHON_VERSION=$PYTHON_VERSION bash ~/$REPO_DIR/tpu/worker_setup.sh"
remote+=" && echo $id > ~/$REPO_DIR/.code_id"  # what launch.sh checks
on_workers all "$remote"
