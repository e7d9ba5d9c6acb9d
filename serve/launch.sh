#!/usr/bin/env bash
# Serve a checkpoint with one of the presets in this folder (what the per-preset scripts call).
#   serve/launch.sh PRESET CHECKPOINT [launcher or vLLM options...]
# The interpreter is the checkout's .venv (make setup) unless $PYTHON names another; options
# such as --port, --host, --api-key and --allowed-media-domains are the launcher's
# (`python -m tlq_vllm.serve --help`), anything else passes through to vLLM.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
if [[ $# -lt 2 ]]; then
  echo "usage: $0 PRESET CHECKPOINT [options]  (presets: $(cd "$HERE" && ls *.yaml | sed 's/\.yaml$//' | xargs))" >&2
  exit 2
fi
preset="$1"; checkpoint="$2"; shift 2
exec "$PYTHON" -m tlq_vllm.serve "$checkpoint" --preset "$HERE/$preset.yaml" "$@"
