#!/usr/bin/env bash
# Copy this checkout to every worker and install it with the [tpu] extra (libtpu).
# Usage: TPU_NAME=... ZONE=... tpu/setup.sh
source "$(dirname "$0")/common.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/rlhf_jax.tar.gz"
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":~/rlhf_jax.tar.gz --zone "$ZONE" \
  --project "$PROJECT" --worker=all
on_all_workers "mkdir -p ~/$REPO_DIR && tar -xzf ~/rlhf_jax.tar.gz -C ~/$REPO_DIR && \
  cd ~/$REPO_DIR && python3 -m pip install -U pip && python3 -m pip install -e '.[tpu]'"
