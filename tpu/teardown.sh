#!/usr/bin/env bash
# Stop the run (SIGTERM: it saves a checkpoint first, see stop.sh) and delete the pod slice.
# Usage: TPU_NAME=... ZONE=... tpu/teardown.sh [--dry-run] [--now]
#   --now  delete at once, without stopping the run (a run loses the steps since its last checkpoint)
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
now=0
for opt in ${OPTS[@]+"${OPTS[@]}"}; do
  case $opt in --now) now=1 ;; *) die "unknown option $opt" ;; esac
done
[ ${#ARGS[@]} -eq 0 ] || die "unexpected arguments: ${ARGS[*]}"
if [ "$now" = 0 ]; then
  # A preempted or unreachable slice has nothing left to stop: delete it anyway.
  DRY_RUN=$DRY_RUN bash "$TPU_DIR/stop.sh" || note "teardown: could not stop the run; deleting anyway"
fi
tpu_vm delete "$TPU_NAME" --quiet
