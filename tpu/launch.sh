#!/usr/bin/env bash
# Run one experiment on every worker at once (JAX multi-host: each worker runs the same command and
# jax.distributed.initialize() finds its peers from the TPU metadata). Output goes to ~/run.log.
# Usage: TPU_NAME=... ZONE=... tpu/launch.sh experiments/dpo_qwen2_5_0_5b.py --set data.path=...
source "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: $0 experiments/NAME.py [--set key=value ...]" >&2; exit 2; }
args=$(printf ' %q' "$@")
on_all_workers "cd ~/$REPO_DIR && nohup python3 -m rlhf_jax run$args > ~/run.log 2>&1 &"
echo "launched on all workers of $TPU_NAME; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f ~/run.log'"
