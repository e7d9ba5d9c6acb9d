#!/usr/bin/env bash
# Serve CHECKPOINT with the 1x3090 preset (1x3090.yaml): serve/1x3090.sh CHECKPOINT [options]
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 1x3090 "$@"
