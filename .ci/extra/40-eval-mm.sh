#!/usr/bin/env bash
# The released llm-jp-eval-mm harness (PyPI eval-mm 0.4.1) in its own environment: it needs
# Python >= 3.12.1 and pins datasets==2.18.0 (llava-jp needs >= 3), so it cannot share ours.
# Installed without its torch/av/webdataset requirements: its tasks, scorers and judge client do
# not import them, and generation runs in llava-jp's environment (scripts/eval_mm_harness.py).
# Then tests/test_eval_mm_harness.py compares the harness's scores with `llava-jp eval`'s.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY312=""
for candidate in python3.12 /root/.pyenv/versions/3.12.*/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12, 1))' 2>/dev/null; then
        PY312="$(command -v "$candidate")"
        break
    fi
done
if [ -z "$PY312" ]; then
    echo "SKIP eval-mm harness test: no Python >= 3.12.1 on this machine (eval-mm 0.4.1 requires it)"
    exit 0
fi

VENV="${EVAL_MM_VENV:-$(mktemp -d)/eval-mm}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import eval_mm" 2>/dev/null; then
    "$PY312" -m venv "$VENV"
    if ! { "$VENV/bin/pip" install -q --no-deps "eval-mm==0.4.1" \
        && "$VENV/bin/pip" install -q "datasets==2.18.0" "numpy<2" "pyarrow<16" rouge-score fugashi \
            unidic-lite emoji "sacrebleu[ja]" scipy openai backoff loguru python-dotenv pillow tqdm; }; then
        echo "SKIP eval-mm harness test: could not install eval-mm 0.4.1 and its scorer dependencies"
        exit 0
    fi
fi
"$VENV/bin/python" -c "from importlib.metadata import version as v; print('eval-mm', v('eval-mm'), 'datasets', v('datasets'))"
LLAVA_JP_EVAL_MM_PYTHON="$VENV/bin/python" python -m pytest -q -rs tests/test_eval_mm_harness.py
