#!/usr/bin/env bash
# Stop any run and delete the pod slice.
# Usage: TPU_NAME=... ZONE=... tpu/teardown.sh
source "$(dirname "$0")/common.sh"
on_all_workers "pkill -f 'rlhf_jax run' || true" || true
gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --quiet
