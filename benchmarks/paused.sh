#!/usr/bin/env bash
# Runs a command with a background job paused, for timings on a shared machine:
#
#   benchmarks/paused.sh python benchmarks/throughput.py
#
# PAUSE_PID_FILE (default /work/study.pid) names a process; its whole process
# group is stopped (SIGSTOP) for the run and continued (SIGCONT) when the
# command ends, fails or is interrupted. The command sees the paused group in
# BENCHMARK_PAUSED_PGID (throughput.py records whether it was stopped).
# Without the file, the command just runs.
set -u
pid_file=${PAUSE_PID_FILE:-/work/study.pid}
group=""
if [ -r "$pid_file" ]; then
  group=$(ps -o pgid= -p "$(cat "$pid_file")" 2>/dev/null | tr -d ' ')
fi
if [ -n "$group" ]; then
  trap 'kill -CONT -- "-$group" 2>/dev/null' EXIT
  trap 'exit 130' INT TERM
  kill -STOP -- "-$group"
  export BENCHMARK_PAUSED_PGID=$group
  echo "paused process group $group" >&2
fi
"$@"
