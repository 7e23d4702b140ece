#!/usr/bin/env bash
# Stage 2 of the reference recipe: instruction tuning on LLaVA-v1.5-Instruct-620K-JA,
# starting from stage 1's projector (outputs/llava-jp-1.3b-s2-stage1/projector.safetensors).
#   scripts/finetune.sh [ACCELERATE_CONFIG] [--key value ...]
# With N GPUs, keep the effective batch at 16: --gradient_accumulation_steps $((4 / N)).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="${1:-$here/accelerate/single_gpu.yaml}"
[ $# -gt 0 ] && shift
exec accelerate launch --config_file "$config" -m llava_jp.cli train --config stage2 "$@"
