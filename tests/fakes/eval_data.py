"""Offline stand-ins for the real benchmarks and judge: tiny datasets in each benchmark's exact
schema, and a local OpenAI-compatible judge server that can misbehave on purpose.

Used by the tests; also handy for a smoke run of ``llava-jp eval`` without network.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

COLORS = ["red", "blue", "green", "yellow"]


def tiny_image(color: str, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def _write_table(rows: dict, features, path: Path) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def write_ja_vg_vqa(path: Path) -> Path:
    """JA-VG-VQA-500 schema: 2 images, 2 + 1 QAs (ids 101, 102, 201)."""
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    qa = {
        "a_objects": List(Value("null")),
        "answer": Value("string"),
        "q_objects": List(Value("null")),
        "qa_id": Value("int64"),
        "question": Value("string"),
    }
    features = Features(
        {
            "image_id": Value("int64"),
            "url": Value("string"),
            "width": Value("int64"),
            "height": Value("int64"),
            "coco_id": Value("float64"),
            "flickr_id": Value("float64"),
            "qas": List(qa),
            "image": ImageFeature(),
        }
    )

    def qa_row(qa_id: int, question: str, answer: str) -> dict:
        return {"a_objects": [], "answer": answer, "q_objects": [], "qa_id": qa_id, "question": question}

    rows = {
        "image_id": [1, 2],
        "url": ["https://example.invalid/1.jpg", "https://example.invalid/2.jpg"],
        "width": [16, 16],
        "height": [16, 16],
        "coco_id": [None, 9.0],
        "flickr_id": [None, None],
        "qas": [
            [qa_row(101, "何色ですか？", "赤色です。"), qa_row(102, "何がありますか？", "車があります。")],
            [qa_row(201, "空は何色？", "青い空です。")],
        ],
        "image": [tiny_image("red"), tiny_image("blue")],
    }
    return _write_table(rows, features, path)


def write_ja_vlm_wild(path: Path) -> Path:
    """JA-VLM-Bench-In-the-Wild schema: 2 questions."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    features = Features(
        {
            "page_url": Value("string"),
            "image_url": Value("string"),
            "image": ImageFeature(),
            "question": Value("string"),
            "answer": Value("string"),
        }
    )
    rows = {
        "page_url": ["https://example.invalid/a", "https://example.invalid/b"],
        "image_url": ["https://example.invalid/a.jpg", "https://example.invalid/b.jpg"],
        "image": [tiny_image("green"), tiny_image("yellow")],
        "question": ["これは何の写真ですか？", "季節はいつですか？"],
        "answer": ["公園の写真です。", "春です。"],
    }
    return _write_table(rows, features, path)


def _heron_questions() -> list[dict]:
    """2 images x (complex, conv, detail): question ids 0-5."""
    texts = {
        "complex": "この場所の特徴を説明してください。",
        "conv": "何色ですか？",
        "detail": "この写真について詳しく説明してください。",
    }
    questions = []
    for image_index, image in enumerate(["001.jpg", "002.jpg"]):
        for category in ("complex", "conv", "detail"):
            questions.append(
                {
                    "question_id": len(questions),
                    "image": image,
                    "category": category,
                    "image_category": "landscape",
                    "text": texts[category],
                    "image_color": COLORS[image_index],
                }
            )
    return questions


def _heron_context(image: str) -> str:
    return f"{image} は単色の画像です。"


def _heron_reference(question_id: int) -> str:
    return f"参照回答{question_id}です。"


def write_heron_table(path: Path) -> Path:
    """Heron-Bench flattened into one table (the schema of ``Silviase/Japanese-Heron-Bench``)."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    answer_models = [
        "claude-3-opus-20240229",
        "gemini-1.0-pro-vision-latest",
        "gpt-4-0125-preview",
        "gpt-4-vision-preview",
    ]
    features = Features(
        {
            "question_id": Value("int64"),
            "image": ImageFeature(),
            "category": Value("string"),
            "image_category": Value("string"),
            "context": Value("string"),
            "text": Value("string"),
            "answer": {m: Value("string") for m in answer_models},
        }
    )
    questions = _heron_questions()
    rows = {
        "question_id": [q["question_id"] for q in questions],
        "image": [tiny_image(q["image_color"]) for q in questions],
        "category": [q["category"] for q in questions],
        "image_category": [q["image_category"] for q in questions],
        "context": [_heron_context(q["image"]) for q in questions],
        "text": [q["text"] for q in questions],
        "answer": [
            {m: _heron_reference(q["question_id"]) if m == "gpt-4-0125-preview" else "他のモデル" for m in answer_models}
            for q in questions
        ],
    }
    return _write_table(rows, features, path)


def write_heron_files(root: Path) -> Path:
    """Heron-Bench in its original file layout (``turing-motors/Japanese-Heron-Bench``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    questions = _heron_questions()
    for q in questions:
        tiny_image(q["image_color"]).save(root / "images" / q["image"])

    def dump(name: str, records: list[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (root / name).write_text(text, encoding="utf-8")

    dump("questions_ja.jsonl", [{k: v for k, v in q.items() if k != "image_color"} for q in questions])
    images = sorted({q["image"] for q in questions})
    dump(
        "context_ja.jsonl",
        [{"id": i[:3], "image": i, "caption": _heron_context(i)} for i in images],
    )
    dump(
        "answers_gpt4.jsonl",
        [
            {
                "question_id": q["question_id"],
                "images": q["image"],
                "image_category": q["image_category"],
                "prompt": q["text"],
                "answer_id": "",
                "model_id": "gpt-4-0125-preview",
                "text": _heron_reference(q["question_id"]),
            }
            for q in questions
        ],
    )
    return root


# ---- llm-jp-eval-mm's further tasks (hub schemas as published; the harness's tasks read them) --


def _jmmmu_features():
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    columns = {"id": Value("string"), "question": Value("string"), "options": Value("string"),
               "explanation": Value("string")}
    columns.update({f"image_{i}": ImageFeature() for i in range(1, 8)})
    columns.update({k: Value("string") for k in
                    ("img_type", "answer", "topic_difficulty", "question_type", "subfield")})
    return Features(columns)


JMMMU_ROWS = {
    "Accounting": [
        ("test_Accounting_1", "<image 1>の色は何ですか？", "['赤', '青', '緑', '黄']", "A",
         "multiple-choice", ["red"]),
        ("test_Accounting_2", "<image 1>と<image 2>の合計は何円ですか？", "[]", "300",
         "open", ["blue", "green"]),
    ],
    "Math": [
        ("test_Math_1", "<image 1>の図形はどれですか？", "['円', '三角形', '四角形']", "C",
         "multiple-choice", ["yellow"]),
    ],
}


def write_jmmmu(folder: Path) -> Path:
    """JMMMU: one config per subject, ``<subject>/test-00000-of-00001.parquet`` (3 questions,
    one of them with two images)."""
    for subject, rows in JMMMU_ROWS.items():
        table = {k: [] for k in _jmmmu_features()}
        for sample_id, question, options, answer, kind, colors in rows:
            images = [tiny_image(c) for c in colors] + [None] * (7 - len(colors))
            values = {"id": sample_id, "question": question, "options": options, "explanation": "",
                      "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy",
                      "question_type": kind, "subfield": subject}
            values.update({f"image_{i}": images[i - 1] for i in range(1, 8)})
            for key in table:
                table[key].append(values[key])
        _write_table(table, _jmmmu_features(), folder / subject / "test-00000-of-00001.parquet")
    return folder


def write_jdocqa(path: Path) -> Path:
    """``speed/JDocQA``: one question of each answer type; the factoid one has two pages."""
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature

    features = Features({
        "question_id": Value("int64"), "question": Value("string"), "answer": Value("string"),
        "answer_type": ClassLabel(names=["yes/no", "factoid", "numerical", "open-ended"]),
        **{f"image_{i}": ImageFeature() for i in range(4)},
    })
    rows = {
        "question_id": [10, 11, 12, 13],
        "question": ["この資料は公開されていますか？", "表の題名は何ですか？", "参加者は何人ですか？",
                     "この資料の目的を説明してください。"],
        "answer": ["はい", "年間予算", "120人", "地域の交通安全を高めることが目的です。"],
        "answer_type": [0, 1, 2, 3],
        "image_0": [tiny_image(c) for c in ("red", "blue", "green", "yellow")],
        "image_1": [None, tiny_image("red"), None, None],
        "image_2": [None] * 4,
        "image_3": [None] * 4,
    }
    return _write_table(rows, features, path)


def write_mecha_ja(path: Path) -> Path:
    """``llm-jp/MECHA-ja``: three questions, Factoid and Non-Factoid, with and without background."""
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    features = Features({
        "question": Value("string"), "options": List(Value("string")), "answer": Value("int64"),
        "answer_type": Value("int64"), "image": ImageFeature(), "background_text": Value("string"),
    })
    rows = {
        "question": ["この動物は何ですか？", "なぜ人々は集まっていますか？", "信号は何色ですか？"],
        "options": [["猫", "犬", "鳥", "魚"], ["祭り", "事故", "雨宿り", "工事"], ["赤", "青", "黄", "白"]],
        "answer": [1, 0, 3],
        "answer_type": [0, 1, 0],
        "image": [tiny_image(c) for c in ("red", "blue", "green")],
        "background_text": ["", "毎年夏に行われる行事です。", ""],
    }
    return _write_table(rows, features, path)


def write_tiny_benchmarks(root: Path) -> dict[str, str]:
    """Every task under ``root``; returns task -> source for ``run_eval(sources=...)``."""
    root = Path(root)
    return {
        "ja-vg-vqa-500": str(write_ja_vg_vqa(root / "ja-vg-vqa-500" / "test-00000-of-00001.parquet")),
        "ja-vlm-bench-in-the-wild": str(write_ja_vlm_wild(root / "ja-vlm-bench-in-the-wild.parquet")),
        "heron-bench": str(write_heron_files(root / "heron-bench")),
        "jmmmu": str(write_jmmmu(root / "jmmmu")),
        "jdocqa": str(write_jdocqa(root / "jdocqa" / "test-00000-of-00001.parquet")),
        "mecha-ja": str(write_mecha_ja(root / "mecha-ja" / "data" / "test-00000-of-00001.parquet")),
    }


# ---- stand-in judge -----------------------------------------------------------------------


def default_judge_reply(payload: dict) -> str:
    """A well-formed reply in the format each judge prompt asks for.

    Heron prompts: reference 8, model 10 if its answer equals the reference else 4.
    1-5 prompt: 5 if the prediction equals the answer else 2.
    """
    content = payload["messages"][-1]["content"]
    if "[Assistant 2]" in content:
        ref = re.search(r"\[Assistant 1\]\n(.*?)\n\n\[End of Assistant 1\]", content, re.DOTALL).group(1)
        ours = re.search(r"\[Assistant 2\]\n(.*?)\n\n\[End of Assistant 2\]", content, re.DOTALL).group(1)
        return f"8 {10 if ours == ref else 4}\nBoth answers were read carefully."
    if '"gpt4o_answer"' in content:
        ref = re.search(r'"gpt4o_answer": (.*),\n', content).group(1)
        ours = re.search(r'"model_answer": (.*)\n', content).group(1)
        score = 10 if ours == ref else 4
        return f'```json\n{{"score_gpt": 8, "score": {score}}}\n```'
    answer = re.search(r"\nAnswer: (.*)\n", content).group(1)
    prediction = re.search(r"\nPrediction: (.*)\n", content).group(1)
    return "5" if prediction == answer else "2"


class StandInJudge:
    """OpenAI-compatible ``/chat/completions`` on 127.0.0.1 for tests.

    ``faults`` is a queue consumed one per request: ``"500"`` (that HTTP status), ``"garbage"`` (a reply
    with no score), ``"malformed"`` (a 200 whose body is not chat-completion JSON) or
    ``("sleep", seconds)`` (answer only after ``seconds``). With the queue empty, requests get
    ``reply_fn(payload)``. ``payloads`` records every request received.
    """

    def __init__(self, reply_fn: Callable[[dict], str] = default_judge_reply, faults=()):
        self.reply_fn = reply_fn
        self.faults = deque(faults)
        self.payloads: list[dict] = []
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge._lock:
                    judge.payloads.append(body)
                    fault = judge.faults.popleft() if judge.faults else None
                if isinstance(fault, tuple) and fault[0] == "sleep":
                    time.sleep(fault[1])
                    fault = None
                if isinstance(fault, str) and fault.isdigit():
                    self._send(int(fault), b'{"error": "stand-in failure"}')
                elif fault == "malformed":
                    self._send(200, b"<html>not json</html>")
                else:
                    content = "I cannot decide." if fault == "garbage" else judge.reply_fn(body)
                    reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    self._send(200, json.dumps(reply, ensure_ascii=False).encode("utf-8"))

            def _send(self, status: int, data: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.payloads)

    def __enter__(self) -> StandInJudge:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
