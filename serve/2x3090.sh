#!/usr/bin/env bash
# Serve CHECKPOINT with the 2x3090 preset (2x3090.yaml): serve/2x3090.sh CHECKPOINT [options]
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 2x3090 "$@"
