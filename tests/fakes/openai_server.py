"""A loopback stand-in for an OpenAI-compatible chat server (what vLLM's API server speaks):
`GET /v1/models` (with vLLM's `max_model_len`) and streamed `POST /v1/chat/completions`.

Every request body is recorded. The answer is a function of the request (the image's pixel
digest, the number of messages, the question), streamed in small pieces; prompts longer than
`max_prompt_chars` are refused with a 400, as vLLM refuses prompts beyond its context.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def image_digest(data_url: str) -> str:
    """The first 8 hex digits of the SHA-1 of the decoded image's RGB pixels."""
    payload = base64.b64decode(data_url.split(",", 1)[1])
    with Image.open(io.BytesIO(payload)) as image:
        return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()[:8]


def expected_answer(messages: list[dict]) -> str:
    """What the stand-in answers to `messages`."""
    images = [image_digest(p["image_url"]["url"]) for m in messages if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image_url"]
    question = messages[-1]["content"]
    question = question if isinstance(question, str) else "".join(p.get("text", "") for p in question)
    return f"画像{'・'.join(images) or 'なし'}、{len(messages)}件目「{question}」への答えです。"


class FakeOpenAIServer:
    def __init__(self, model_name: str = "llava-jp-test", max_model_len: int = 1024,
                 max_prompt_chars: int | None = None, piece_delay: float = 0.0):
        self.model_name = model_name
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    return self._json(404, {"error": {"message": "not found"}})
                self._json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "test", "max_model_len": max_model_len}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.requests.append(body)
                if self.path != "/v1/chat/completions" or body.get("model") != model_name:
                    return self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                      "type": "NotFoundError", "code": 404}})
                prompt_chars = sum(len(m["content"]) if isinstance(m["content"], str) else
                                   sum(len(p.get("text", "")) for p in m["content"]) for m in body["messages"])
                if max_prompt_chars is not None and prompt_chars > max_prompt_chars:
                    return self._json(400, {"error": {"message": "This model's maximum context length is exceeded.",
                                                      "type": "BadRequestError", "code": 400}})
                answer = expected_answer(body["messages"])[: body.get("max_tokens") or None]
                with lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    pieces = [answer[i:i + 4] for i in range(0, len(answer), 4)]
                    for i, piece in enumerate(pieces + [None]):
                        delta = {"content": piece} if piece is not None else {}
                        if i == 0:
                            delta["role"] = "assistant"
                        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                                 "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": None if piece is not None else "stop"}]}
                        self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(piece_delay)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                finally:
                    with lock:
                        outer.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
