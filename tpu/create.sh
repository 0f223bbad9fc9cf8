#!/usr/bin/env bash
# Create the TPU VM pod slice $TPU_NAME ($ACCELERATOR_TYPE, image $RUNTIME_VERSION; see tpu/common.sh).
# Usage: TPU_NAME=... ZONE=... [ACCELERATOR_TYPE=v5litepod-16] [SPOT=1] tpu/create.sh [--dry-run]
#   SPOT=1 asks for a spot slice (cheaper; preempted at any time: recreate it, run setup.sh, relaunch)
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
expect_no_args
spot=()
[ "${SPOT:-0}" != 1 ] || spot=(--spot)
tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
