"""The demo's OpenAI backend (`llava-jp demo --backend openai --base-url ...`) against a loopback
stand-in of an OpenAI-compatible server (tests/fakes/openai_server.py). The same backend is run
against a real vLLM server by .ci/extra/30-vllm.sh."""

import hashlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from llava_jp.cli import main as cli_main
from llava_jp.infer.chat import ChatError, GenerationSettings
from llava_jp.infer.remote import RemoteChatSession, RemoteModel

from tests.fakes.openai_server import FakeOpenAIServer, expected_answer, image_digest
from tests.helpers import chat_pairs

gr = pytest.importorskip("gradio", reason="the demo tests need the [demo] extra (gradio)")
from gradio_client import Client, handle_file  # noqa: E402

from llava_jp.infer.demo import Conversation, DemoHandlers, build_demo, serve  # noqa: E402

SLIDERS = (0.7, 0.9, 40, 1.1)  # temperature, top_p, max_new_tokens, repetition_penalty


@pytest.fixture()
def fake():
    server = FakeOpenAIServer(max_model_len=4096)
    yield server
    server.close()


def pixels_digest(path) -> str:
    with Image.open(path) as image:
        return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()[:8]


def test_handlers_send_the_image_history_and_settings_and_stream_the_answer(fake, tmp_path):
    handlers = DemoHandlers(remote=RemoteModel(fake.url))
    red = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(red)
    _, state, _, status = handlers.load_image(str(red), None)
    assert "画像を読み込みました（64×48）" in status

    for question in ("何色ですか？", "形は何ですか？"):
        partial = []
        for chat, state, status, box in handlers.respond(question, state, *SLIDERS):
            partial.append(chat[-1]["content"])
        assert status == "回答しました。" and box == ""
        assert any(0 < len(p) < len(chat[-1]["content"]) for p in partial)  # streamed in pieces

    first, second = fake.requests
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    image_part, text_part = second["messages"][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert image_digest(image_part["image_url"]["url"]) == pixels_digest(red)  # the pixels, losslessly
    assert text_part == {"type": "text", "text": "何色ですか？"} and second["messages"][2]["content"] == "形は何ですか？"
    assert second["messages"][1]["content"] == expected_answer(first["messages"])  # the history as shown
    assert (second["temperature"], second["top_p"], second["max_tokens"]) == (0.7, 0.9, 40)
    assert second["repetition_penalty"] == 1.1 and second["stream"] is True and second["model"] == "llava-jp-test"
    assert chat_pairs(chat)[1] == ("user:形は何ですか？", "assistant:" + expected_answer(second["messages"]))
    assert state.messages == [{"role": m["role"], "content": m["content"]} for m in chat]


def test_greedy_and_text_only_requests(fake):
    session = RemoteChatSession(RemoteModel(fake.url, "llava-jp-test"))
    answer = session.ask("日本の首都は？", GenerationSettings(max_new_tokens=200))
    request, = fake.requests
    assert request["messages"] == [{"role": "user", "content": "日本の首都は？"}]
    assert request["temperature"] == 0.0 and "repetition_penalty" not in request
    assert answer == expected_answer(request["messages"]) and "画像なし" in answer


def test_a_prompt_the_server_refuses_as_too_long_drops_the_oldest_exchanges():
    server = FakeOpenAIServer(max_prompt_chars=50)
    try:
        history = [{"role": "user", "content": "あ" * 20}, {"role": "assistant", "content": "い" * 20},
                   {"role": "user", "content": "う" * 5}, {"role": "assistant", "content": "え" * 5}]
        handlers = DemoHandlers(remote=RemoteModel(server.url))
        state = Conversation(messages=history, display=list(history))
        *_, (chat, new_state, status, _) = handlers.respond("質問", state, *SLIDERS)
        assert "古いやり取り 1 回分" in status and new_state.messages[:2] == history[2:]
        assert [len(r["messages"]) for r in server.requests] == [5, 3]
        *_, (chat, same, status, box) = handlers.respond("長" * 100, new_state, *SLIDERS)
        assert same is new_state and status.startswith("⚠️ サーバーが質問を受け付けませんでした") and box == "長" * 100
    finally:
        server.close()


def test_startup_mistakes_are_one_line_japanese_errors(fake, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    for args, message in [
        (["--backend", "openai"], "--backend openai には --base-url"),
        (["--backend", "openai", "--base-url", closed], f"サーバー {closed} に接続できませんでした"),
        (["--backend", "openai", "--base-url", fake.url, "--model-name", "other"], "サーバーにモデル other がありません"),
        (["--base-url", fake.url], "--base-url と --model-name は --backend openai と一緒に"),
    ]:
        assert cli_main(["demo", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("エラー: ") and message in err and err.count("\n") == 1


def test_over_http_concurrent_sessions_reach_the_server_at_once(tmp_path):
    server = FakeOpenAIServer(piece_delay=0.05)
    remote = RemoteModel(server.url)
    assert remote.context_length == 1024  # from the server's max_model_len
    demo = build_demo(remote=remote, example_dir=tmp_path / "examples")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(demo, "127.0.0.1", port, block=False)
    n = 4
    images = []
    for i in range(n):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40 + i, 40), (60 * i, 0, 255 - 60 * i)).save(images[-1])
    start = threading.Barrier(n)

    def one_user(i):
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(handle_file(str(images[i])), api_name="/load_image")
        start.wait(timeout=60)
        chat, status, _ = client.predict(f"質問{i}", *SLIDERS, api_name="/chat")
        return chat, status

    try:
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one_user, range(n), timeout=120))
    finally:
        demo.close()
        server.close()
    for i, (chat, status) in enumerate(results):
        assert status == "回答しました。"
        (question, answer), = chat_pairs(chat)
        assert question == f"user:質問{i}" and f"画像{pixels_digest(images[i])}" in answer and f"「質問{i}」" in answer
    assert server.max_in_flight > 1  # the demo does not serialise requests to a batching server
