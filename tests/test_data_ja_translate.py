"""`data_ja translate` with the API backend against a stand-in server on 127.0.0.1."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_ja.backends import BATCH_PROMPT
from data_ja.cli import main
from data_ja.translate import TranslationCache, mask, rejection_reason, unmask

REPO = Path(__file__).resolve().parents[1]


def fake_japanese(text: str) -> str:
    """The stand-in 'translation': every English word becomes katakana, all else is kept."""
    if "UNTRANSLATABLE" in text:
        return text  # stays English: must be rejected
    return re.sub(r"[A-Za-z]+", lambda m: "ア" * ((len(m.group()) + 1) // 2), text)


class StandInAPI:
    """OpenAI-compatible chat completions; records every request's user text. Request number
    `block_at` (1-based) never gets an answer; texts containing FLAKY fail once with HTTP 500."""

    def __init__(self, block_at=None, break_batches=False):
        self.requests, self.block_at, self.break_batches = [], block_at, break_batches
        self.release, self.lock, self.flaked = threading.Event(), threading.Lock(), set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                system, user = (m["content"] for m in body["messages"])
                with api.lock:
                    api.requests.append(user)
                    number = len(api.requests)
                    flaky = "FLAKY" in user and user not in api.flaked
                    api.flaked.add(user)
                if number == api.block_at:
                    api.release.wait(timeout=30)
                    return
                if flaky:
                    self.send_error(500)
                    return
                if system == BATCH_PROMPT:
                    reply = "not a JSON array" if api.break_batches else json.dumps(
                        [fake_japanese(t) for t in json.loads(user)], ensure_ascii=False)
                else:
                    reply = fake_japanese(user)
                payload = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    servers = []

    def start(**kwargs):
        servers.append(StandInAPI(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _sample(i, question, answer, image=True):
    sample = {"id": f"s{i}", "conversations": [{"from": "human", "value": question},
                                               {"from": "gpt", "value": answer}]}
    if image:
        sample["image"] = f"coco/{i:06d}.jpg"
    return sample


ENGLISH = [
    _sample(0, "<image>\nWhat color is the bus?", "The bus is white and red."),
    _sample(1, "Describe the image briefly.\n<image>", "A dog runs on the beach."),
    _sample(2, "Describe the image briefly.\n<image>", "Two cats sleep on a sofa."),
    _sample(3, "<image>\nWhat is in the region [0.12, 0.55, 0.40, 0.98]?",
            "The region [0.12, 0.55, 0.40, 0.98] shows a red umbrella."),
    _sample(4, "<image>\nHow many people are there?", "There are 3 people and 12 birds."),
    _sample(5, "<image>\nList what you see.", "First, a tree.\nSecond, a house.\nThird, a car."),
    _sample(6, "Write code that prints hello.", "Use this:\n```python\nprint('hello')\n```\nDone.",
            image=False),
    _sample(7, "<image>", "A plain red square."),
    _sample(8, "<image>\nWhat does the sign say?", "It says `STOP` in white letters."),
]
UNIQUE_TRANSLATABLE = 16  # distinct turn texts above with letters outside protected spans


def _write(tmp_path, samples, name="en.json"):
    path = tmp_path / name
    path.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    return path


def _args(src, out, url, *extra):
    return ["translate", str(src), "--out", str(out), "--api-base", url, "--model", "stand-in",
            "--retry-wait", "0", *extra]


def test_mask_protects_image_tags_coordinates_code_and_urls():
    text = ("<image>\nBox [0.12, 0.55, 0.40, 0.98] and `x = 1` see https://example.com/a.png\n"
            "```\ncode here\n```")
    masked, spans = mask(text)
    assert spans == ["<image>", "[0.12, 0.55, 0.40, 0.98]", "`x = 1`",
                     "https://example.com/a.png", "```\ncode here\n```"]
    assert masked == "⟦0⟧\nBox ⟦1⟧ and ⟦2⟧ see ⟦3⟧\n⟦4⟧"
    assert unmask(masked, spans) == text


@pytest.mark.parametrize("output, reason", [
    ("⟦0⟧\nバスは⟦1⟧に3台あります。", None),
    ("⟦0⟧\nバスは3台あります。", "placeholders changed"),
    ("⟦0⟧\nバスは⟦1⟧に⟦1⟧3台あります。", "placeholders changed"),
    ("⟦0⟧ バスは⟦1⟧に3台あります。", "line breaks changed"),
    ("⟦0⟧\nバスは⟦1⟧にあります。", "numbers lost"),
    ("⟦0⟧\nThere are 3 buses at ⟦1⟧.", "not Japanese"),
    ("⟦0⟧\n" + "バス" * 60 + "⟦1⟧3", "implausible length"),
    ("", "empty"),
])
def test_rejection_reasons(output, reason):
    assert rejection_reason("⟦0⟧\nThere are 3 buses at ⟦1⟧.", 2, output) == reason


def test_short_names_may_stay_as_they_are_but_sentences_may_not():
    assert rejection_reason("Coca Cola", 0, "Coca Cola") is None
    assert rejection_reason("The sign says stop here.", 0, "The sign says stop here.") == \
        "not Japanese"


def test_cache_drops_a_partial_last_line_left_by_a_kill(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = TranslationCache(path)
    cache.put_many({"a dog": "犬"}, "m")
    cache.close()
    with path.open("a", encoding="utf-8") as f:
        f.write('{"key": "trunc')  # killed mid-write
    cache = TranslationCache(path)
    assert cache.get("a dog") == "犬" and len(cache) == 1
    cache.put_many({"a cat": "猫"}, "m")
    cache.close()
    assert TranslationCache(path).get("a cat") == "猫"


def test_translates_preserving_structure_and_reports_what_failed(tmp_path, api):
    server = api()
    bad = _sample(9, "<image>\nUNTRANSLATABLE words stay in English", "Fine.")
    flaky = _sample(10, "<image>\nIs this FLAKY?", "No.")
    src = _write(tmp_path, ENGLISH + [bad, flaky])
    out = tmp_path / "ja.json"
    assert main(_args(src, out, server.url, "--retries", "2", "--workers", "4")) == 1
    samples = json.loads(out.read_text(encoding="utf-8"))
    assert [s["id"] for s in samples] == [s["id"] for s in ENGLISH] + ["s10"]
    by_id = {s["id"]: s for s in samples}
    assert by_id["s0"] == {**ENGLISH[0], "conversations": [
        {"from": "human", "value": "<image>\nアア アアア ア アア アア?"},
        {"from": "gpt", "value": "アア アア ア アアア アア アア."}]}
    assert by_id["s3"]["conversations"][1]["value"].count("[0.12, 0.55, 0.40, 0.98]") == 1
    assert "3" in by_id["s4"]["conversations"][1]["value"]
    assert by_id["s5"]["conversations"][1]["value"].count("\n") == 2
    assert "```python\nprint('hello')\n```" in by_id["s6"]["conversations"][1]["value"]
    assert "image" not in by_id["s6"]
    assert by_id["s7"]["conversations"][0]["value"] == "<image>"
    assert "`STOP`" in by_id["s8"]["conversations"][1]["value"]

    failed = json.loads((tmp_path / "ja.json.failed.json").read_text(encoding="utf-8"))
    assert failed["samples_failed"] == 1 and failed["texts_failed"] == 1
    assert failed["items"] == [{
        "index": 9, "id": "s9", "turn": 0, "source": bad["conversations"][0]["value"],
        "reason": "not Japanese", "output": "⟦0⟧\nUNTRANSLATABLE words stay in English"}]
    # Every text once, the untranslatable one 3 times (2 retries), the flaky one twice.
    assert len(server.requests) == UNIQUE_TRANSLATABLE + 1 + 3 + 2 + 1
    # with 4 workers the request order is not fixed: look for the placeholder in any request
    assert any("⟦0⟧" in r for r in server.requests) and "<image>" not in "".join(server.requests)


def _cached_sources(path):
    return [json.loads(line)["src"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_killed_run_resumes_without_re_requesting_cached_texts(tmp_path, api):
    src = _write(tmp_path, ENGLISH)
    reference = tmp_path / "reference.json"
    reference_api = api()
    assert main(_args(src, reference, reference_api.url)) == 0
    assert len(reference_api.requests) == UNIQUE_TRANSLATABLE

    done_before_kill = 5
    server = api(block_at=done_before_kill + 1)
    out, cache = tmp_path / "ja.json", tmp_path / "cache.jsonl"
    args = _args(src, out, server.url, "--cache", str(cache), "--workers", "1", "--retries", "0")
    proc = subprocess.Popen([sys.executable, "-m", "data_ja", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while len(server.requests) <= done_before_kill and proc.poll() is None:
        assert time.monotonic() < deadline, "the translate run never reached the blocked request"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    cached = _cached_sources(cache)
    assert len(cached) == done_before_kill
    server.release.set()

    requests_before = len(server.requests)
    assert main(args) == 0
    resumed = server.requests[requests_before:]
    assert len(resumed) == UNIQUE_TRANSLATABLE - done_before_kill
    assert not {mask(s)[0] for s in cached} & set(resumed)
    assert out.read_bytes() == reference.read_bytes()

    requests_before = len(server.requests)
    assert main(args) == 0  # everything cached now: no request at all
    assert len(server.requests) == requests_before


@pytest.mark.parametrize("break_batches", [False, True])
def test_batched_concurrent_requests_give_the_same_output(tmp_path, api, break_batches):
    src = _write(tmp_path, ENGLISH)
    single, batched = tmp_path / "single.json", tmp_path / "batched.json"
    assert main(_args(src, single, api().url)) == 0
    server = api(break_batches=break_batches)
    assert main(_args(src, batched, server.url, "--batch-size", "4", "--workers", "3")) == 0
    assert batched.read_bytes() == single.read_bytes()
    batches = -(-UNIQUE_TRANSLATABLE // 4)
    # A reply that is not a JSON array falls back to one request per text.
    expected = batches + UNIQUE_TRANSLATABLE if break_batches else batches
    assert len(server.requests) == expected
