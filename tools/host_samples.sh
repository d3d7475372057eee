#!/usr/bin/env bash
# A sampling profile of a program's main thread, with a gdb-compatible debugger only (the GPU
# machines have cuda-gdb but no perf): runs COMMAND, waits WAIT seconds (past loading and
# warm-up), then takes SAMPLES stacks of its thread 1 by attaching the debugger each time, then
# stops the program. The stacks go to OUT.txt, their summary (tools/stack_summary.py) to stdout.
# The program needs its symbols: a `strip = false` build.
#   usage: GDB=cuda-gdb WAIT=40 SAMPLES=60 tools/host_samples.sh OUT COMMAND [ARGS...]
set -uo pipefail
out=$1
shift
GDB=${GDB:-gdb}
"$@" >"$out.log" 2>&1 &
pid=$!
# The program stops with this script, also when a timeout stops the script.
trap 'kill "$pid" 2>/dev/null' EXIT
sleep "${WAIT:-20}"
: >"$out.txt"
for _ in $(seq "${SAMPLES:-40}"); do
  kill -0 "$pid" 2>/dev/null || break
  echo "=== sample" >>"$out.txt"
  "$GDB" -q -batch -p "$pid" -ex "set pagination off" -ex "thread 1" -ex "bt 60" 2>/dev/null \
    | grep '^#' >>"$out.txt"
done
python3 "$(dirname "$0")/stack_summary.py" "$out.txt" 40
