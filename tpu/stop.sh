#!/usr/bin/env bash
# Stop the run on every worker: SIGTERM makes all processes agree on one step, save it and exit with
# status 75 (rlhf_jax.cli.EXIT_PREEMPTED); ~/run.log ends with that status. Rerun tpu/launch.sh with
# the same arguments to resume from the checkpoint. Waits up to $STOP_TIMEOUT s (default 600).
# Usage: TPU_NAME=... ZONE=... tpu/stop.sh [--dry-run]
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
expect_no_args
timeout=${STOP_TIMEOUT:-600}
[[ $timeout =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds, got '$timeout'"
remote="pkill -TERM -f $RUN_MATCH"
remote+="; for _ in \$(seq $timeout); do pgrep -f $RUN_MATCH > /dev/null || exit 0; sleep 1; done"
remote+="; echo \"rlhf-jax still running on \$(hostname) after $timeout s\" >&2; exit 1"
on_workers all "$remote"
