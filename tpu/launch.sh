#!/usr/bin/env bash
# Start one experiment on every worker at once: each runs the same `python3 -m rlhf_jax run` in
# ~/$REPO_DIR with the venv of setup.sh, in the background, appending to ~/run.log (which ends
# with the exit status: 0 done, 75 stopped by a signal after saving a checkpoint, so relaunch the
# same command to resume). JAX's multi-controller runtime joins the workers into one program.
# Before anything is sent, the command is checked here: `rlhf-jax run EXPERIMENT ARGS --print-config`
# must accept it (a bad --set key or value stops the launch), using $PYTHON (default python3) with
# this checkout importable; and a worker whose code is not this checkout's as tpu/setup.sh last
# installed it (edited since, or setup.sh did not finish there) refuses to start. --no-check skips both.
# Usage: TPU_NAME=... ZONE=... tpu/launch.sh [--dry-run] [--no-check] experiments/NAME.py[:ARG] [--set KEY=VALUE ...]
#   e.g. tpu/launch.sh experiments/dpo_qwen2_5_0_5b.py --set workdir=/mnt/shared/runs/dpo \
#          --set data.train=data/ultrafeedback_binarized/train_prefs.jsonl
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
check=1
for opt in ${OPTS[@]+"${OPTS[@]}"}; do
  case $opt in --no-check) check=0 ;; *) die "unknown option $opt" ;; esac
done
[ ${#ARGS[@]} -ge 1 ] || die "usage: $0 [--dry-run] [--no-check] experiments/NAME.py[:ARG] [--set KEY=VALUE ...]"
experiment=${ARGS[0]%%:*}
case $experiment in
  /* | ../*) die "$experiment: give the experiment's path relative to the checkout (workers run it in ~/$REPO_DIR)" ;;
esac
[ -f "$REPO_ROOT/$experiment" ] || die "experiment file not found: $REPO_ROOT/$experiment"
if [ "$check" = 1 ]; then
  # A plain local process: no multi-process flags from this shell, nor the variables with which
  # rlhf_jax.distributed starts jax.distributed by itself (its _AUTO), no accelerator.
  if ! (cd "$REPO_ROOT" && env -u RLHF_JAX_COORDINATOR -u RLHF_JAX_NUM_PROCESSES -u RLHF_JAX_PROCESS_ID \
          -u RLHF_JAX_DISTRIBUTED -u TPU_WORKER_HOSTNAMES -u SLURM_NTASKS -u OMPI_COMM_WORLD_SIZE \
          JAX_PLATFORMS=cpu "${PYTHON:-python3}" -m rlhf_jax run "${ARGS[@]}" --print-config > /dev/null); then
    die "the local check \`rlhf-jax run ${ARGS[*]} --print-config\` failed (above); nothing was launched" \
      "(--no-check skips the check)"
  fi
fi
has_workdir=0
for arg in "${ARGS[@]}"; do
  case $arg in workdir=* | --set=workdir=*) has_workdir=1 ;; esac
done
[ "$has_workdir" = 1 ] || note "note: no --set workdir=...: the run directory (checkpoints) is runs/NAME" \
  "under ~/$REPO_DIR on each worker's own disk; a slice with several workers needs one directory they all" \
  "share (README, \"Run on a TPU pod\")"
# On each worker: refuse a second run, then start it in the background (immune to the ssh session's
# end) with its output and final exit status appended to ~/run.log.
remote="cd ~/$REPO_DIR || exit 1"
if [ "$check" = 1 ]; then
  id=$(code_id)
  remote+="; if [ \"\$(cat .code_id 2> /dev/null)\" != $id ]; then echo \"the code on \$(hostname) is not"
  remote+=" this checkout's: rerun tpu/setup.sh (launch.sh --no-check launches anyway)\" >&2; exit 1; fi"
fi
remote+="; if pgrep -f $RUN_MATCH > /dev/null"
remote+="; then echo \"rlhf-jax is already running on \$(hostname) (tpu/stop.sh stops it)\" >&2; exit 1; fi"
remote+="; { trap \"\" HUP; echo \"== \$(date -u +%FT%TZ) launch\""
remote+="; RLHF_JAX_DISTRIBUTED=auto ~/$REPO_DIR/.venv/bin/python3 -m rlhf_jax run $(shell_quote "${ARGS[@]}")"
remote+="; echo \"== rlhf-jax exit status \$? (75: stopped after saving a checkpoint; relaunch to resume)\""
remote+="; } >> ~/run.log 2>&1 < /dev/null &"
on_workers all "$remote" \
  || die "the launch failed on a worker (gcloud's output above names it); the processes started on the others" \
    "wait for it and give up after 300 s (rlhf_jax.distributed.INIT_TIMEOUT_S): tpu/stop.sh stops them now"
[ "$DRY_RUN" = 1 ] || note "launched on every worker of $TPU_NAME; follow process 0's log with:" \
  "tpu/ssh.sh --worker=0 'tail -f ~/run.log'"
