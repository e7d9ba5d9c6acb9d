#!/usr/bin/env bash
# Serve CHECKPOINT with the cpu preset (cpu.yaml): serve/cpu.sh CHECKPOINT [options]
exec "$(dirname "${BASH_SOURCE[0]}")/launch.sh" cpu "$@"
