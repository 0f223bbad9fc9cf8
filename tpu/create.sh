#!/usr/bin/env bash
# Create the TPU VM pod slice named $TPU_NAME (see common.sh for the settings).
# Usage: TPU_NAME=... ZONE=... [ACCELERATOR_TYPE=v5litepod-16] [SPOT=1] tpu/create.sh
source "$(dirname "$0")/common.sh"
extra=()
[ "${SPOT:-0}" = "1" ] && extra+=(--spot)
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
  --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${extra[@]}"
