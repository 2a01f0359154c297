#!/usr/bin/env bash
# Single node, N processes:  launch/torchrun.sh 8 parallel.ep=8 model=deepseek_v3_like ...
# NPROC defaults to the number of visible GPUs (or 2 on a CPU-only machine).
# Extra torchrun flags: TORCHRUN_ARGS="--max-restarts=1" launch/torchrun.sh 4 ...
#
# Stopping (docs/reliability.md): SIGTERM / SIGUSR1 to this script go to torchrun, which
# forwards them to the workers (Ctrl-C reaches every process of the terminal's group by
# itself); the workers finish the step, write a checkpoint and exit 75. torchrun exits 1
# whenever a worker exits non-zero (after a SignalException traceback when it got the
# signal itself), so this script exits with the workers' own code, which rank 0 leaves
# in MOEFOLD_EXIT_FILE: 75 preempted, 3 diverged, 4 hung peer, 2 config error.
set -euo pipefail
cd "$(dirname "$0")/.."
# The venv's python when there is one (`make install`), else $PYTHON or python on PATH.
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; else
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OWN_EXIT_FILE=""
if [[ -z "${MOEFOLD_EXIT_FILE:-}" ]]; then
  OWN_EXIT_FILE=$(mktemp -t moefold-exit.XXXXXX); export MOEFOLD_EXIT_FILE=$OWN_EXIT_FILE; fi
: > "$MOEFOLD_EXIT_FILE"
# trainer.torchrun is torchrun that exits 2 quietly after a user error (trainer/torchrun.py).
# SIGUSR1 (Slurm's --signal=USR1@<s>) is forwarded too; the workers get up to
# MOEFOLD_SHUTDOWN_TIMEOUT seconds to write their checkpoint before torchrun SIGKILLs them.
# shellcheck disable=SC2086
"$PY" -m trainer.torchrun --standalone --nproc_per_node="$NPROC" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout="${MOEFOLD_SHUTDOWN_TIMEOUT:-600}" ${TORCHRUN_ARGS:-} \
  -m trainer.train "$@" &
PID=$!
for sig in TERM USR1 HUP; do trap "kill -s $sig $PID 2>/dev/null || true" "$sig"; done
trap ':' INT  # Ctrl-C already reached torchrun and the workers: do not send it twice
rc=0
while kill -0 "$PID" 2>/dev/null; do wait "$PID" && rc=0 || rc=$?; done
code=$(tr -dc 0-9 < "$MOEFOLD_EXIT_FILE" || true)
[[ -n "$OWN_EXIT_FILE" ]] && rm -f "$OWN_EXIT_FILE"
if [[ $rc -ne 0 && -n "$code" ]]; then
  echo "launch/torchrun.sh: the workers exited with code $code (torchrun: $rc)" >&2
  exit "$code"
fi
exit "$rc"
