#!/usr/bin/env bash
# Stop the run on every worker: SIGTERM makes all processes agree on one step, save it and exit with
# status 75 (rlhf_jax.cli.EXIT_PREEMPTED); ~/run.log ends with that status. Rerun tpu/launch.sh with
# the same arguments to resume from the checkpoint. Waits up to $STOP_TIMEOUT s (default 600) on
# each worker; exit status 1 when a run is still there (gcloud names the worker).
# Usage: TPU_NAME=... ZONE=... tpu/stop.sh [--dry-run] [--kill]
#   --kill  SIGKILL instead: ends a run that does not stop (hung) at once, without saving; the TPU is
#           free for the next launch (~/run.log ends with exit status 137)
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
signal=TERM
for opt in ${OPTS[@]+"${OPTS[@]}"}; do
  case $opt in --kill) signal=KILL ;; *) die "unknown option $opt" ;; esac
done
[ ${#ARGS[@]} -eq 0 ] || die "unexpected argument ${ARGS[0]}"
timeout=${STOP_TIMEOUT:-600}
[[ $timeout =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds, got '$timeout'"
hint=""
[ "$signal" = KILL ] || hint=" (tpu/stop.sh --kill ends it without saving)"
remote="pkill -$signal -f $RUN_MATCH"
remote+="; for _ in \$(seq $timeout); do pgrep -f $RUN_MATCH > /dev/null || exit 0; sleep 1; done"
remote+="; echo \"rlhf-jax still running on \$(hostname) after $timeout s$hint\" >&2; exit 1"
on_workers all "$remote"
