#!/usr/bin/env bash
# Run a shell command on the workers of the pod slice (all by default), e.g. follow the log of
# process 0, which alone prints progress and metrics:
#   tpu/ssh.sh --worker=0 'tail -f ~/run.log'
# Usage: TPU_NAME=... ZONE=... tpu/ssh.sh [--dry-run] [--worker=all|0|1|...] COMMAND
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
parse_args "$@"
worker=all
for opt in ${OPTS[@]+"${OPTS[@]}"}; do
  case $opt in --worker=*) worker=${opt#--worker=} ;; *) die "unknown option $opt" ;; esac
done
[[ $worker =~ ^(all|[0-9]+)$ ]] || die "--worker must be all or a worker number, got '$worker'"
[ ${#ARGS[@]} -eq 1 ] || die "give one COMMAND (quote it); usage: $0 [--worker=all|N] COMMAND"
on_workers "$worker" "${ARGS[0]}"
