"""A llava-jp release served by vLLM (`llava-jp serve`, the Transformers backend, our remote code):
greedy answers token for token equal to our own `generate`, on our transformers and on the one
vLLM pins; 16 concurrent requests; the demo's OpenAI backend against the real server.

Runs only where vLLM is installed: LLAVA_JP_VLLM_PYTHON names that environment's python
(.ci/extra/30-vllm.sh installs one and sets it). The model is the `tiny` preset's (a GPT-2 LM, the
quickstart's kind), and for the greedy tokens also the same with a Llama LM; LLAVA_JP_VLLM_MODEL
may name a saved model folder to release instead of the tiny GPT-2 one.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

VLLM_PYTHON = os.environ.get("LLAVA_JP_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="needs vLLM: set LLAVA_JP_VLLM_PYTHON "
                                "(.ci/extra/30-vllm.sh installs vLLM and runs this file)")
REPO = Path(__file__).resolve().parents[2]
MAX_TOKENS = 24
START_TIMEOUT_S = 900

# What a transformers user runs on the release (ECOSYSTEM idiom), run in a given environment:
# reads [{"image", "question"}] as JSON on stdin, prints [{"prompt_ids", "new_ids"}].
OURS = """
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
path, max_new_tokens = sys.argv[1], int(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
results = []
for item in json.load(sys.stdin):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(item["image"]).convert("RGB"), text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    results.append({"prompt_ids": inputs["input_ids"][0].tolist(), "new_ids": out[0, n:].tolist()})
print(json.dumps(results))
"""


def ours(python: str, release: Path, items: list[dict]) -> list[dict]:
    done = subprocess.run([python, "-c", OURS, str(release), str(MAX_TOKENS)], input=json.dumps(items),
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def strip_eos(ids: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first EOS (our generate pads after it)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


# The `tiny` preset's LM is GPT-2-shaped, as are the quickstart's and the llm-jp-1.3b recipe's; vLLM
# serves it through our remote code's two GPT-2 fixes (llava_jp/core/vllm_compat.py). The same
# preset with a Llama LM (llm-jp-3's kind; head size 32, which vLLM's CPU attention supports)
# is checked for greedy tokens only, to keep the job short.
LLAMA_LM = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "tie_word_embeddings": False}


def build_sensitive_model(path: Path, lm: str) -> Path:
    """A tiny model whose answers depend clearly on the image and the question (random weights
    with std 0.2; at the default std a random LM answers alike whatever it is asked): a
    token-for-token comparison then covers the image path, not only the text."""
    import yaml

    from llava_jp.presets.builder import PRESET_DIR
    from tests.helpers import save_sensitive_tiny_model

    if lm == "gpt2":
        return save_sensitive_tiny_model(path)
    preset = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text(encoding="utf-8"))
    preset["language_model"] = {"name_or_path": None, "config": LLAMA_LM}
    preset_file = path.parent / "tiny-llama.yaml"
    preset_file.write_text(yaml.safe_dump(preset, allow_unicode=True), encoding="utf-8")
    return save_sensitive_tiny_model(path, str(preset_file))


@pytest.fixture(scope="module")
def workspace(request, tmp_path_factory):
    """A model (the tiny GPT-2 one, or LLAVA_JP_VLLM_MODEL in its place; or the tiny Llama one),
    its release, and image questions."""
    lm = request.param
    root = tmp_path_factory.mktemp(f"vllm_{lm}")
    model = (lm == "gpt2" and os.environ.get("LLAVA_JP_VLLM_MODEL")) or str(build_sensitive_model(root / "model", lm))
    release = root / "release"
    done = subprocess.run([sys.executable, "-m", "llava_jp.cli", "release", "--model", model, "--out", str(release)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from llava_jp.synthetic import write_dataset

    data = write_dataset(root / "questions", n_train=0, n_test=6, seed=123)
    items = [{"image": str(data["images"] / row["image"]), "question": row["question"], "answer": row["answer"]}
             for row in json.loads(data["test"].read_text(encoding="utf-8"))]
    return {"release": release, "items": items}


GPT2_ONLY = pytest.mark.parametrize("workspace", ["gpt2"], indirect=True)


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    """`llava-jp serve` on a free loopback port (one per model); the engine start time is printed."""
    from benchmarks.serving import ServerDidNotStart, start_server, stop_server

    log = tmp_path_factory.mktemp("vllm_log") / "server.log"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf_modules"))}
    try:
        proc, url, start_s = start_server(workspace["release"], VLLM_PYTHON, log, env=env, timeout_s=START_TIMEOUT_S)
    except ServerDidNotStart as err:
        pytest.fail(str(err))
    print(f"vLLM engine start: {start_s:.1f} s")
    try:
        yield url
    finally:
        stop_server(proc)


def image_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def ask_vllm(client, item: dict) -> dict:
    response = client.chat.completions.create(
        model="llava-jp", max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(item["image"])}},
                                               {"type": "text", "text": item["question"]}]}])
    choice = response.choices[0]
    return {"prompt_ids": response.prompt_token_ids, "new_ids": choice.token_ids, "text": choice.message.content,
            "finish_reason": choice.finish_reason}


@pytest.mark.parametrize("workspace", ["gpt2", "llama"], indirect=True)
def test_greedy_tokens_equal_ours_on_both_transformers_versions(server, workspace):
    from openai import OpenAI

    from llava_jp.infer.chat import load_model

    client = OpenAI(base_url=server, api_key="EMPTY")
    items = workspace["items"][:6]
    served = [ask_vllm(client, item) for item in items]
    eos = load_model(str(workspace["release"]), "cpu")[1].tokenizer.eos_token_id
    for python in (sys.executable, VLLM_PYTHON):  # our transformers, and the one vLLM pins
        for item, mine, theirs in zip(items, ours(python, workspace["release"], items), served):
            assert theirs["prompt_ids"] == mine["prompt_ids"], f"prompt differs for {item} ({python})"
            assert strip_eos(theirs["new_ids"], eos) == strip_eos(mine["new_ids"], eos), f"answer differs for {item} ({python})"
    answers = [s["text"] for s in served]
    print("answers:", answers)
    assert len(set(answers)) > 1, "the model answers the same whatever it is shown"


@GPT2_ONLY
def test_sixteen_concurrent_requests_are_all_answered_as_alone(server, workspace):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="EMPTY", timeout=600)
    items = [workspace["items"][i % len(workspace["items"])] for i in range(16)]
    alone = {item["image"] + item["question"]: ask_vllm(client, item)["new_ids"] for item in items}
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda item: ask_vllm(client, item), items))
    elapsed = time.perf_counter() - started
    print(f"16 concurrent requests: {elapsed:.1f} s, {sum(len(r['new_ids']) for r in together) / elapsed:.1f} tokens/s")
    assert all(r["finish_reason"] in ("stop", "length") and r["new_ids"] for r in together)
    assert [r["new_ids"] for r in together] == [alone[item["image"] + item["question"]] for item in items]


@GPT2_ONLY
def test_demo_openai_backend_matches_the_local_chat(server, workspace):
    from llava_jp.infer.chat import ChatSession, GenerationSettings, load_model
    from llava_jp.infer.remote import RemoteChatSession, RemoteModel

    settings = GenerationSettings(max_new_tokens=MAX_TOKENS)
    model, processor = load_model(str(workspace["release"]), "cpu")
    image = workspace["items"][0]["image"]
    local = ChatSession(model, processor, image=image)
    remote = RemoteChatSession(RemoteModel(server), image=image)
    for question in ("図形は何色ですか？", "図形の形は何ですか？"):  # the second turn carries the history
        assert remote.ask(question, settings) == local.ask(question, settings)
    assert remote.messages == local.messages
