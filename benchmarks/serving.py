"""Serving throughput: vLLM (`llava-jp serve`) against our own batched `generate_answers`.

    python -m benchmarks.serving --release DIR --vllm-python VENV/bin/python [--out serving.json]

Both sides answer the same image questions with exactly `--tokens` new tokens each (vLLM:
`min_tokens` = `max_tokens`; ours: `min_new_tokens` = `max_new_tokens`), so a token means the
same work on both. Batch 1: requests one after another; batch 16: 16 concurrent requests (vLLM
schedules them together) or one `generate_answers` call over 16 questions (ours, left-padded).
Reported: engine start (launch to the first `/v1/models` answer), new tokens per second for
each side and batch size, and the vLLM / ours ratio. Our side runs while the vLLM server is
stopped, so the two never share the CPU.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerDidNotStart(RuntimeError):
    """The engine exited or missed its deadline before answering; the message ends with its log."""


def start_server(release: Path, vllm_python: str, log: Path, env: dict | None = None,
                 timeout_s: float | None = None) -> tuple[subprocess.Popen, str, float]:
    """`llava-jp serve` on a free loopback port; returns (process, base url, seconds to the first answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llava_jp.cli", "serve", "--model", str(release), "--port", str(port),
                                 "--served-model-name", "llava-jp", "--vllm-python", vllm_python, "--", "--max-num-seqs", "16"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            return proc, url, time.perf_counter() - started
        except OSError:
            late = timeout_s is not None and time.perf_counter() - started > timeout_s
            if proc.poll() is not None or late:
                if late:
                    stop_server(proc)
                raise ServerDidNotStart("vLLM did not start:\n" + log.read_text()[-4000:]) from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def vllm_tokens_per_s(url: str, items: list[dict], tokens: int, concurrency: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="EMPTY", timeout=600)

    def ask(item):
        data = base64.b64encode(Path(item["image"]).read_bytes()).decode()
        response = client.chat.completions.create(
            model="llava-jp", max_tokens=tokens, temperature=0.0, extra_body={"min_tokens": tokens},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                                   {"type": "text", "text": item["question"]}]}])
        return response.usage.completion_tokens

    ask(items[0])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        produced = sum(pool.map(ask, items))
    return produced / (time.perf_counter() - started)


def ours_tokens_per_s(release: Path, items: list[dict], tokens: int, batch_size: int) -> float:
    from PIL import Image

    from llava_jp.infer.chat import load_model
    from llava_jp.infer.generate import generate_answers

    model, processor = load_model(str(release), "cpu")
    images = [Image.open(item["image"]).convert("RGB") for item in items]
    questions = [item["question"] for item in items]
    generate_answers(model, processor, images[:1], questions[:1], max_new_tokens=tokens, min_new_tokens=tokens)
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        generate_answers(model, processor, images[start:start + batch_size], questions[start:start + batch_size],
                         max_new_tokens=tokens, min_new_tokens=tokens)
    return len(items) * tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="a release folder (`llava-jp release`)")
    parser.add_argument("--vllm-python", required=True, help="python of the environment with vLLM")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--requests", type=int, default=32, help="questions per measurement (a multiple of 16)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    from llava_jp.synthetic import write_dataset

    work = Path(tempfile.mkdtemp(prefix="llava-jp-serving-"))
    data = write_dataset(work / "data", n_train=0, n_test=args.requests, seed=7)
    rows = json.loads(data["test"].read_text(encoding="utf-8"))[: args.requests]
    items = [{"image": str(data["images"] / r["image"]), "question": r["question"]} for r in rows]

    try:
        proc, url, start_s = start_server(args.release, args.vllm_python, work / "server.log")
    except ServerDidNotStart as err:
        raise SystemExit(str(err)) from None
    try:
        vllm = {1: vllm_tokens_per_s(url, items, args.tokens, 1), 16: vllm_tokens_per_s(url, items, args.tokens, 16)}
    finally:
        stop_server(proc)
    ours = {b: ours_tokens_per_s(args.release, items, args.tokens, b) for b in (1, 16)}
    result = {
        "engine_start_s": round(start_s, 1),
        "tokens_per_answer": args.tokens,
        "requests": args.requests,
        "vllm_tokens_per_s": {str(b): round(v, 1) for b, v in vllm.items()},
        "ours_tokens_per_s": {str(b): round(v, 1) for b, v in ours.items()},
        "ratio_vllm_over_ours": {str(b): round(vllm[b] / ours[b], 2) for b in (1, 16)},
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, ensure_ascii=False, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
