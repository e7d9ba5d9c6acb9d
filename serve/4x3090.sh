#!/usr/bin/env bash
# Serve CHECKPOINT with the 4x3090 preset (4x3090.yaml): serve/4x3090.sh CHECKPOINT [options]
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 4x3090 "$@"
