#!/usr/bin/env bash
# Runs the suite in both pinned environments: tests marked `train` need LLaMA-Factory and run
# in .venv/train first (they also build the shared trained adapter); the rest run in
# .venv/serve (vLLM, Ray Data/Serve). Prints each run's slowest tests, so a CI log says where a
# slow run went (the real engine's speed follows the CPU), and the time spent per tier at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export E2E_LLM_TIMINGS=${E2E_LLM_TIMINGS:-$PWD/.cache/test-timings}
rm -rf "$E2E_LLM_TIMINGS" && mkdir -p "$E2E_LLM_TIMINGS"

status=0
"$VENV/train/bin/python" -m pytest -m train -p no:cacheprovider --durations=10 "$@" || status=$?
# pytest exits 5 when a selection holds no test; that is not a failure here.
[ $status -eq 5 ] && status=0
train_status=$status
"$VENV/serve/bin/python" -m pytest -m "not train" -p no:cacheprovider --durations=20 "$@" || status=$?
[ $status -eq 5 ] && status=$train_status
"$VENV/serve/bin/python" tests/timings.py "$E2E_LLM_TIMINGS"
exit $status
