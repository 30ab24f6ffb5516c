#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# One GPU session's work as a detached chain on the device machine (2026-12-02, issues #11 and #15),
# so that it is not cut at one call's 10 minutes: short device calls start it and poll
# /tmp/chain/status, copying the finished stages' tarballs from /tmp/chain/out to $OUT.
# Stash p1, p2, p3 first (bench/device_ray.py docstring), then, from the carried repo copy:
#     cp -r . /tmp/e2e-repo && setsid nohup bash /tmp/e2e-repo/bench/device_session.sh >/dev/null 2>&1 &
# Stages: setup (LLaMA-Factory + Ray, SmolLM2 rebuilt); the local-recipe sweep (recipe_sweep.py)
# while the 7B-shaped model is built; the MFU tries (train_throughput.py: tutorial, the committed
# 80gb recipe, each try, the keepable winners merged); the winners through `e2e-llm train`
# (device_ray.py train full --direct).
set -u
R=/tmp/e2e-repo
C=/tmp/chain
mkdir -p $C/out
cd $R || exit 1
export PYTHONUNBUFFERED=1
log() { echo "$(date -u +%T) $*" >>$C/status; }
pack() { tar czf "$C/out/$1.tar.gz" -C "$C" "${@:2}" 2>/dev/null; }

echo $$ >$C/pid
log start
python3 bench/device_ray.py setup >$C/setup.log 2>&1
log "setup rc=$?"
python3 bench/device_ray.py setup --7b >$C/build7b.log 2>&1 &
build=$!

python3 bench/recipe_sweep.py run --workers "${SWEEP_WORKERS:-6}" --budget-s "${SWEEP_BUDGET_S:-330}" --out $C/sweep --work /tmp/e2e-sweep \
    >$C/sweep.log 2>&1
log "sweep rc=$?"
cp /tmp/e2e-sweep/*.log $C/sweep/ 2>/dev/null
pack sweep sweep sweep.log setup.log
log "sweep packed"

wait $build
log "build7b rc=$?"
PYTHONPATH=/tmp/e2e-site python3 bench/train_throughput.py run --model-dir /tmp/e2e-gpu/models/qwen2.5-7b-shape \
    --work /tmp/e2e-bench --out $C/tput --budget-s "${TPUT_BUDGET_S:-780}" \
    --only tutorial cluster-80gb try:512x16 try:packing-no-neat try:fused-adamw try:1024x10 try:torch-compile \
    80gb+combo >$C/tput.log 2>&1
log "tput rc=$?"
cp /tmp/e2e-bench/*.log $C/tput/ 2>/dev/null
pack tput tput tput.log build7b.log
log "tput packed"

# the merged winners (or nothing) through Ray Train, with the same args directly first
sets=$(python3 -c "
import json, shlex
r = json.load(open('$C/tput/train_throughput.json'))['variants'].get('80gb+combo', {})
print(' '.join(f'--set {k} {shlex.quote(json.dumps(v))}' for k, v in (r.get('overrides', {}) if 'tokens_per_s' in r else {}).items()))
" 2>>$C/status)
log "ray sets: ${sets:-none}"
if [ -n "$sets" ] || [ "${RAY_ALWAYS:-0}" = 1 ]; then
    eval python3 bench/device_ray.py setup --7b >>$C/build7b.log 2>&1
    eval python3 bench/device_ray.py train full --direct --steps 30 --set save_steps 30 --set eval_steps 30 $sets \
        --out $C/ray >$C/ray.log 2>&1
    log "ray rc=$?"
    cp /tmp/e2e-gpu/direct.log /tmp/e2e-gpu/full.log $C/ray/ 2>/dev/null
    pack ray ray ray.log
fi
log "all done"
