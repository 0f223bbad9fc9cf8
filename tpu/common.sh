#!/usr/bin/env bash
# Shared settings for the TPU pod scripts. Override any of them in the environment.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME, e.g. export TPU_NAME=rlhf-v5e-16}"
: "${ZONE:?set ZONE, e.g. export ZONE=us-west4-a}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ACCELERATOR_TYPE:=v5litepod-16}"
: "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"
: "${REPO_DIR:=rlhf_jax}"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all \
    --command "$1"
}
