"""`llava-jp serve`: the vLLM command it assembles and its one-line refusals. The server itself
is exercised by tests/vllm (needs vLLM; .ci/extra/30-vllm.sh)."""

import json
import os
import sys

import pytest

from llava_jp.cli import main as cli_main


@pytest.fixture()
def release(tmp_path):
    path = tmp_path / "my-release"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_llava_jp.LlavaJpModel"}}))
    return path


@pytest.fixture()
def vllm_importable(tmp_path, monkeypatch):
    """This interpreter, with an importable `vllm` (the command only checks that vLLM is there)."""
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))


def test_the_command_runs_the_transformers_backend_with_our_remote_code(release, vllm_importable, capsys):
    code = cli_main(["serve", "--model", str(release), "--port", "8123", "--vllm-python", sys.executable,
                     "--print-command", "--", "--max-num-seqs", "16"])
    command = capsys.readouterr().out.split()
    assert code == 0
    assert command[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(release)]
    joined = " ".join(command)
    for part in ("--trust-remote-code", "--model-impl transformers", "--host 127.0.0.1", "--port 8123",
                 "--served-model-name my-release"):
        assert part in joined
    assert command[-2:] == ["--max-num-seqs", "16"]  # after --: passed on as they are
    if "--enforce-eager" in command:  # no GPU for vLLM: eager, and a fixed KV-cache budget
        assert command[command.index("--kv-cache-memory-bytes") + 1] == str(2**30)


@pytest.mark.parametrize("case, message", [
    ("no-config", "no config.json"),
    ("no-auto-model", "config.json has no auto_map entry for AutoModel"),
    ("no-vllm", "vLLM is not installed for"),
])
def test_refusals_are_one_line(tmp_path, release, capsys, case, message):
    model = release
    if case == "no-config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "no-auto-model":
        (release / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "x.Y"}}))
    code = cli_main(["serve", "--model", str(model), "--vllm-python", sys.executable, "--print-command"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("llava-jp serve: ") and message in err and err.count("\n") == 1


def test_the_release_dtype_is_served_unless_asked_otherwise(release, vllm_importable, capsys):
    config = json.loads((release / "config.json").read_text()) | {"dtype": "float32"}
    (release / "config.json").write_text(json.dumps(config))
    assert cli_main(["serve", "--model", str(release), "--vllm-python", sys.executable, "--print-command"]) == 0
    command = capsys.readouterr().out.split()
    assert command[command.index("--dtype") + 1] == "float32"  # vLLM's auto would downcast it to bf16
    assert cli_main(["serve", "--model", str(release), "--vllm-python", sys.executable, "--print-command",
                     "--dtype", "bfloat16"]) == 0
    command = capsys.readouterr().out.split()
    assert command[command.index("--dtype") + 1] == "bfloat16"
