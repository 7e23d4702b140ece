#!/usr/bin/env bash
# The suite on the lowest transformers setup.cfg allows (the main run has the newest release).
# A venv over the system site-packages overrides only transformers (and the tokenizers it pins).
set -euo pipefail
cd "$(dirname "$0")/../.."
FLOOR=$(python - <<'PY'
import configparser, re
requires = configparser.ConfigParser()
requires.read("setup.cfg")
print(re.search(r"transformers>=([\d.]+)", requires["options"]["install_requires"]).group(1))
PY
)
VENV=${TMPDIR:-/tmp}/llava-jp-transformers-$FLOOR
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/pip" install -q "transformers==$FLOOR"; then
    echo "skipped: cannot install transformers==$FLOOR" >&2
    exit 0
fi
echo "== transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)') (floor)"
# the 2-process engine tests (-m distributed, ~5 min) run once, on the newest release, in the main run
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not distributed"
