#!/usr/bin/env bash
# Stage 1 of the reference recipe: projector alignment on LLaVA-Pretrain-JA.
#   scripts/pretrain.sh [ACCELERATE_CONFIG] [--key value ...]
# ACCELERATE_CONFIG: one of scripts/accelerate/*.yaml (default: single_gpu.yaml).
# Any training config key can be overridden after it, e.g. --data_path my.json --resume.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="${1:-$here/accelerate/single_gpu.yaml}"
[ $# -gt 0 ] && shift
exec accelerate launch --config_file "$config" -m llava_jp.cli train --config stage1 "$@"
