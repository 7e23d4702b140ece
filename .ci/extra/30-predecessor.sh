#!/usr/bin/env bash
# Predecessor import against LLaVA-JP v1.1's own code: its checkpoint and reference outputs are
# written under transformers 4.40 (tests/fakes/llava_jp_v1_1/write_fixture.py), in a venv that
# overrides only transformers (+ its tokenizers / huggingface-hub pins) and adds einops.
set -uo pipefail
cd "$(dirname "$0")/../.."
venv="${TMPDIR:-/tmp}/llava-jp-tf440"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import transformers, einops; assert transformers.__version__.startswith('4.40')" 2>/dev/null; then
    python -m venv --system-site-packages "$venv" && "$venv/bin/pip" install -q "transformers==4.40.*" einops
    if [ $? -ne 0 ]; then
        echo "skip: could not install transformers 4.40 into $venv (needs PyPI)"
        exit 0
    fi
fi
LLAVA_JP_PREDECESSOR_PYTHON="$venv/bin/python" python -m pytest -q -rs tests/test_predecessor_fixture.py
