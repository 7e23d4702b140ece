"""`llava-jp demo`: the handlers, the app over HTTP (8 concurrent sessions), and a real browser."""

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from llava_jp.infer.chat import ChatSession, GenerationSettings, load_model

from tests.helpers import chat_pairs as _pairs
from tests.helpers import save_sensitive_tiny_model

gr = pytest.importorskip("gradio", reason="the demo tests need the [demo] extra (gradio)")
from gradio_client import Client, handle_file  # noqa: E402

from llava_jp.infer.demo import Conversation, DemoHandlers, build_demo, make_example_images, serve  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=12)
SLIDERS = (SETTINGS.temperature, SETTINGS.top_p, SETTINGS.max_new_tokens, SETTINGS.repetition_penalty)
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 0), (128, 0, 128), (0, 200, 200), (90, 90, 90), (255, 140, 0)]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A tiny model whose answers depend clearly on the image, the question and the history."""
    return load_model(str(save_sensitive_tiny_model(tmp_path_factory.mktemp("sensitive_tiny"))), device="cpu")


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    """The demo on a free loopback port (images over 1 megapixel refused)."""
    model, processor = demo_model
    demo = build_demo(model, processor, max_image_pixels=1_000_000, example_dir=tmp_path_factory.mktemp("examples"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


# -- handlers, without a server --------------------------------------------------------------
def test_handlers_stream_and_keep_the_conversation_in_the_state(demo_model, tmp_path):
    model, processor = demo_model
    handlers = DemoHandlers(model, processor)
    red = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(red)
    preview, state, chat, status = handlers.load_image(str(red), None)
    assert preview.size == (64, 48) and chat == [] and "画像を読み込みました（64×48）" in status

    partial = []  # the answer as shown after each update (the same list object is yielded again)
    for chat, state, status, box in handlers.respond("何色ですか？", state, *SLIDERS):
        partial.append(chat[-1]["content"])
    expected = ChatSession(model, processor, image=red).ask("何色ですか？", SETTINGS)
    assert chat == [{"role": "user", "content": "何色ですか？"}, {"role": "assistant", "content": expected}]
    assert state.messages == chat and status == "回答しました。" and box == ""
    assert any(0 < len(p) < len(expected) and expected.startswith(p) for p in partial)  # streamed

    # a bad file keeps the conversation; a new image starts a new one; reset keeps the image
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    _, kept, kept_chat, status = handlers.load_image(str(broken), state)
    assert kept is state and kept_chat == chat and status.startswith("⚠️ 画像ファイルとして読み込めませんでした")
    fresh, fresh_chat, status = handlers.reset(state)
    assert fresh.messages == fresh_chat == [] and fresh.image is state.image and status == "会話をリセットしました。"
    cleared = handlers.load_image(None, state)
    assert cleared[1].image is None and cleared[2] == []


def test_handlers_refuse_bad_input_in_japanese(demo_model):
    model, processor = demo_model
    handlers = DemoHandlers(model, processor)
    state = Conversation(messages=[{"role": "user", "content": "前"}, {"role": "assistant", "content": "答"}])
    for question, sliders, message in [
        ("  ", SLIDERS, "質問を入力してください"),
        ("何色？", (5.0, 1.0, 12, 1.0), "temperature は 0.0 以上 2.0 以下"),
        ("あ" * 600, SLIDERS, "質問が長すぎます"),
    ]:
        (chat, new_state, status, box), = handlers.respond(question, state, *sliders)
        assert new_state is state and status.startswith("⚠️") and message in status and box == question


def test_a_failed_generation_leaves_the_conversation_as_it_was(demo_model, monkeypatch):
    model, processor = demo_model
    handlers = DemoHandlers(model, processor)
    state = Conversation(messages=[{"role": "user", "content": "前"}, {"role": "assistant", "content": "答"}])
    state.display = list(state.messages)

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(model, "generate", broken)
    *_, (chat, new_state, status, box) = handlers.respond("何色？", state, *SLIDERS)
    assert new_state is state and chat == state.display and box == "何色？"
    assert status == "⚠️ 内部エラーで回答できませんでした。サーバーのログを確認してください。"


def test_example_images_are_drawn_at_startup(tmp_path):
    paths = make_example_images(tmp_path)
    assert list(paths) == ["赤い丸", "青い四角", "緑の三角", "数字の7"]
    for path in paths.values():
        with Image.open(path) as image:
            assert image.size == (256, 256) and len(image.getcolors()) > 1


# -- over HTTP -----------------------------------------------------------------------------------
def test_eight_concurrent_sessions_each_get_their_own_conversation(server, demo_model, tmp_path):
    model, processor = demo_model
    n = 8
    images, questions = [], []
    for i in range(n):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48 + 8 * i, 48), COLOURS[i]).save(images[-1])
        questions.append((f"質問{i}：何色ですか？", f"形は何ですか？{i}"))
    # each conversation alone, greedy: what its session must get back
    expected = []
    for image, (q1, q2) in zip(images, questions):
        session = ChatSession(model, processor, image=image)
        expected.append([("user:" + q1, "assistant:" + session.ask(q1, SETTINGS)),
                         ("user:" + q2, "assistant:" + session.ask(q2, SETTINGS))])
    # every conversation gets its own answers at both turns, so a mix-up would show
    assert len({e[0][1] for e in expected}) == len({e[1][1] for e in expected}) == n

    start = threading.Barrier(n)

    def one_user(i):
        client = Client(server, verbose=False)  # one client = one Gradio session
        client.predict(handle_file(str(images[i])), api_name="/load_image")
        start.wait(timeout=60)
        streamed = []
        for question in questions[i]:
            job = client.submit(question, *SLIDERS, api_name="/chat")
            chat, status, _ = job.result(timeout=120)
            assert status == "回答しました。"
            streamed.append(len(job.outputs()))
        return chat, streamed

    began = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one_user, range(n), timeout=240))
    assert time.perf_counter() - began < 240
    for i, (chat, streamed) in enumerate(results):
        assert _pairs(chat) == expected[i], f"session {i} got another conversation's turns"
        assert min(streamed) >= 3  # first update, at least one streamed piece, the final state


def test_uploads_that_are_not_usable_get_japanese_messages_over_http(server, tmp_path):
    client = Client(server, verbose=False)
    good, big, text = tmp_path / "good.png", tmp_path / "big.png", tmp_path / "notes.txt"
    Image.new("RGB", (40, 40), (0, 0, 255)).save(good)
    Image.new("RGB", (1200, 1000), (0, 0, 255)).save(big)
    text.write_text("画像ではありません", encoding="utf-8")
    assert "画像を読み込みました" in client.predict(handle_file(str(good)), api_name="/load_image")[2]
    chat, _, _ = client.predict("何色？", *SLIDERS, api_name="/chat")
    _, chat_after, status = client.predict(handle_file(str(big)), api_name="/load_image")
    assert "画像が大きすぎます（1200×1000 = 1,200,000 画素）" in status and chat_after == chat
    _, chat_after, status = client.predict(handle_file(str(text)), api_name="/load_image")
    assert "画像ファイルとして読み込めませんでした" in status and chat_after == chat


# -- in a real browser -----------------------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000", "--lang=ja-JP"]

RECORD_ANSWER_JS = """
window.__answers = [];
const root = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = root.querySelectorAll('[data-testid="bot"]');
  const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
  if (text && window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
}).observe(root, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip)")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (scripts/ci_system_deps.sh)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def test_browser_upload_ask_stream_follow_up(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(condition, what, timeout=60):
        return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda _: condition(), message=what)

    def status():
        return browser.find_element(By.ID, "status").text

    def squash(text):  # the DOM and WebDriver lay out line breaks differently
        return "".join(text.split())

    def answers():
        return [squash(e.text) for e in browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')]

    def ask(question, n_answers):
        box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        wait_for(lambda: len(answers()) == n_answers and "回答しました" in status(), f"answer {n_answers}")

    picture = tmp_path / "red_circle.png"
    make_example_images(tmp_path)["赤い丸"].rename(picture)
    browser.get(server)
    upload = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]"), "upload field")
    upload.send_keys(str(picture))
    wait_for(lambda: "画像を読み込みました（256×256）" in status(), "image loaded")
    assert browser.find_element(By.CSS_SELECTOR, "#image-preview img").get_attribute("src")

    browser.execute_script(RECORD_ANSWER_JS)
    ask("この画像について説明してください。", 1)
    first = answers()[0]
    seen = [squash(text) for text in browser.execute_script("return window.__answers")]
    assert first and seen[-1] == first
    assert any(0 < len(s) < len(first) and first.startswith(s) for s in seen), f"no partial answer seen: {seen}"

    ask("何色ですか？", 2)
    assert answers()[0] == first and answers()[1]
    users = [e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]')]
    assert users == ["この画像について説明してください。", "何色ですか？"]
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'demo.png'}")
