"""Item 4: the web demo (a real `llava-jp demo` process on loopback) under load and abuse:
20 concurrent sessions all answered with their own conversations, clear errors for hostile
uploads, prompts and parameters, and the server's memory bounded (peak RSS reported)."""

import colorsys
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from llava_jp.infer.chat import ChatSession, GenerationSettings, load_model

from tests.helpers import chat_pairs, save_sensitive_tiny_model
from tests.reliability.conftest import scaled
from tests.reliability.faults import png_header

gr = pytest.importorskip("gradio", reason="the demo tests need the [demo] extra (gradio)")
psutil = pytest.importorskip("psutil")
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from llava_jp.infer.demo import Conversation, DemoHandlers

SETTINGS = GenerationSettings(max_new_tokens=12)  # greedy
SLIDERS = (SETTINGS.temperature, SETTINGS.top_p, SETTINGS.max_new_tokens, SETTINGS.repetition_penalty)
MAX_PIXELS = 1_000_000
# what 20 sessions and every abuse below may add to the server: one request at a time (the queue's
# concurrency is 1), and the largest is an image shrunk to 4096 px, ~300 MB while it is preprocessed
RSS_GROWTH_LIMIT = 600 * 2**20


class RssMonitor(threading.Thread):
    """Samples a process's resident memory every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(0.05):
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.Error:
                return

    def now(self) -> int:
        return self.process.memory_info().rss

    def high_water_mark(self) -> int:
        """The kernel's own peak RSS (VmHWM), which no sampling can miss."""
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_server")
    model = save_sensitive_tiny_model(root / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(root / "server.log", "w") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "llava_jp.cli", "demo", "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port), "--max-image-pixels", str(MAX_PIXELS), "--device", "cpu"],
                                stdout=log, stderr=subprocess.STDOUT,
                                # one thread, as the expected answers are computed here: bit-identical logits
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    monitor = RssMonitor(proc.pid)
    monitor.start()
    yield {"url": f"http://127.0.0.1:{port}/", "proc": proc, "rss": monitor, "log": root / "server.log", "model": model}
    monitor.stopped.set()
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _conversation(url, image, questions, start=None):
    client = Client(url, verbose=False)  # one client = one Gradio session
    assert "画像を読み込みました" in client.predict(handle_file(str(image)), api_name="/load_image")[2]
    if start:
        start.wait(timeout=60)
    for question in questions:
        chat, status, _ = client.predict(question, *SLIDERS, api_name="/chat")
        assert status == "回答しました。", status
    return chat_pairs(chat)


def test_concurrent_sessions_are_all_answered_without_cross_talk(server, tmp_path, checked):
    n = scaled(20, 60)
    images, questions = [], []
    for i in range(n):
        rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.5 + 0.5 * (i % 2), 1.0 - 0.4 * (i % 3) / 2))
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40 + 4 * i, 48), rgb).save(images[-1])
        questions.append((f"質問{i}：何色ですか？", f"形は何ですか？{i}"))
    # each conversation alone, greedy, with the same weights on one thread: what its session must get back
    model, processor = load_model(str(server["model"]), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = []
        for image, (q1, q2) in zip(images, questions):
            session = ChatSession(model, processor, image=image)
            expected.append([("user:" + q, "assistant:" + session.ask(q, SETTINGS)) for q in (q1, q2)])
    finally:
        torch.set_num_threads(threads)
    assert len({e[0][1] for e in expected}) == len({e[1][1] for e in expected}) == n  # a mix-up would show
    baseline = server["rss"].now()

    start = threading.Barrier(n)
    began = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_conversation, server["url"], images[i], questions[i], start) for i in range(n)]
        results = [f.result(timeout=300) for f in futures]
    seconds = time.perf_counter() - began
    for i, pairs in enumerate(results):
        assert pairs == expected[i], f"session {i} got another conversation's turns"
    growth = max(server["rss"].samples) - baseline
    assert growth < RSS_GROWTH_LIMIT
    checked("concurrent sessions, 2 turns each, all answered as when alone", n)
    checked("wall time of the concurrent phase (s)", round(seconds, 1))
    checked("server RSS before -> peak during the concurrent phase (MiB)",
            f"{baseline / 2**20:.0f} -> {max(server['rss'].samples) / 2**20:.0f}")


def test_hostile_uploads_prompts_and_parameters_get_clear_errors(server, tmp_path, checked):
    client = Client(server["url"], verbose=False)
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (0, 0, 255)).save(good)
    baseline = server["rss"].now()
    assert "画像を読み込みました" in client.predict(handle_file(str(good)), api_name="/load_image")[2]
    chat, _, _ = client.predict("何色？", *SLIDERS, api_name="/chat")

    truncated = good.read_bytes()[:60]
    uploads = {
        "bomb.png": (png_header(30_000, 30_000), "画像が大きすぎます"),  # 900 megapixels claimed: PIL's bomb error
        "huge.png": (png_header(12_000, 8_000), "画像が大きすぎます（12000×8000"),  # PIL would only warn
        "over_limit.png": (None, "画像が大きすぎます（1200×1000 = 1,200,000 画素）"),
        "notes.txt": ("画像ではありません".encode(), "画像ファイルとして読み込めませんでした"),
        "empty.png": (b"", "画像ファイルとして読み込めませんでした"),
        "truncated.png": (truncated, "画像ファイルとして読み込めませんでした"),
        "random.jpg": (os.urandom(4096), "画像ファイルとして読み込めませんでした"),
    }
    for name, (data, message) in uploads.items():
        path = tmp_path / name
        if data is None:
            Image.new("RGB", (1200, 1000), (0, 0, 255)).save(path)
        else:
            path.write_bytes(data)
        _, chat_after, status = client.predict(handle_file(str(path)), api_name="/load_image")
        assert message in status and chat_after == chat, (name, status)  # the conversation is kept

    # a file over the server's upload limit (64 MB) is refused by the server, before it is read whole
    import httpx

    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(65 * 2**20)
    with open(big, "rb") as f:
        response = httpx.post(server["url"] + "gradio_api/upload", files={"files": ("big.png", f)}, timeout=60)
    assert response.status_code == 413 and "exceeded maximum allowed size" in response.text, (response.status_code, response.text[:200])

    _, status, box = client.predict("あ" * 200_000, *SLIDERS, api_name="/chat")  # ~600 KB of question
    assert status.startswith("⚠️ 質問が長すぎます") and len(box) == 200_000

    refused_by_gradio = {  # outside the sliders' ranges or not numbers: Gradio refuses, saying why
        (-1.0, 1.0, 12, 1.0): "less than minimum", (2.5, 1.0, 12, 1.0): "greater than maximum",
        (0.0, 0.0, 12, 1.0): "less than minimum", (0.0, 1.0, 0, 1.0): "less than minimum",
        (0.0, 1.0, 10**9, 1.0): "greater than maximum", (0.0, 1.0, 12, 0.5): "less than minimum",
        ("abc", 1.0, 12, 1.0): "Expected a `float`", (0.0, None, 12, 1.0): "Expected a `float`",
    }
    for sliders, message in refused_by_gradio.items():
        with pytest.raises(AppError, match=message):
            client.predict("何色？", *sliders, api_name="/chat")
    _, status, _ = client.predict("何色？", 0.0, 1.0, 1.5, 1.0, api_name="/chat")
    assert status.startswith("⚠️ max_new_tokens は整数にしてください"), status

    # JSON cannot carry NaN or infinity: the handlers refuse them too
    model, processor = load_model(str(server["model"]), device="cpu")
    handlers = DemoHandlers(model, processor)
    for sliders in [(math.nan, 1.0, 12, 1.0), (0.0, 1.0, 12, math.inf), (0.0, math.nan, 12, 1.0), (0.0, 1.0, "12", 1.0)]:
        (_, _, status, _), = handlers.respond("何色？", Conversation(), *sliders)
        assert status.startswith("⚠️") and "にしてください" in status, (sliders, status)

    chat_end, status, _ = client.predict("形は？", *SLIDERS, api_name="/chat")  # the session still works
    assert status == "回答しました。" and chat_pairs(chat_end)[:-1] == chat_pairs(chat)

    # few pixels, extreme shape: padded to a square it would take 4.8 GB (shrunk first, it is answered)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (40_000, 1), (255, 0, 0)).save(wide)
    assert "画像を読み込みました（40000×1）" in client.predict(handle_file(str(wide)), api_name="/load_image")[2]
    assert client.predict("何色？", *SLIDERS, api_name="/chat")[1] == "回答しました。"
    assert server["proc"].poll() is None
    growth = max(server["rss"].samples) - baseline
    assert growth < RSS_GROWTH_LIMIT
    n = len(uploads) + 1 + 1 + len(refused_by_gradio) + 1 + 4 + 1
    checked("hostile inputs refused with a clear message (or, for the 40000x1 image, answered)", n)
    checked("server peak RSS, sampled / kernel high-water mark (MiB)",
            f"{max(server['rss'].samples) / 2**20:.0f} / {server['rss'].high_water_mark() / 2**20:.0f}")


def test_the_page_shows_each_answer_as_the_history_keeps_it(monkeypatch):
    """Found by the 60-session soak: an answer ending in a space (here U+3000) was shown with it
    while the history kept it trimmed, so the page and the model disagreed."""
    from llava_jp.presets.builder import build

    model, processor = build("tiny", pretrained=False)
    answer = processor.tokenizer("赤です。\u3000 ", add_special_tokens=False, return_tensors="pt")["input_ids"]

    def generate(streamer, **kwargs):
        streamer.put(torch.zeros(1, 1, dtype=torch.long))  # the prompt, which the streamer skips
        streamer.put(answer[0])
        streamer.end()

    monkeypatch.setattr(model, "generate", generate)
    *_, (chat, state, status, _) = DemoHandlers(model, processor).respond("何色？", Conversation(), *SLIDERS)
    assert status == "回答しました。"
    assert chat[-1]["content"] == state.messages[-1]["content"] == "赤です。"
