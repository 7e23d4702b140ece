"""`translate`: an English LLaVA-format file -> Japanese, resumable.

Each turn's text is masked (`<image>`, code, coordinate lists, URLs become placeholders such as
`⟦0⟧`), translated by a backend (`backends.py`), checked (placeholders, line breaks, numbers,
Japanese share, plausible length), retried when the check fails, and unmasked. Accepted
translations go to an append-only JSONL cache keyed by the source text, written as soon as they
arrive, so a killed run resumes without requesting them again. Samples with any text that could
not be translated are left out of the output and listed in the failure report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Protocol

from tqdm import tqdm

from .conversation import DEFAULT_MIN_JAPANESE_SHARE, IMAGE_TAG, japanese_share, numbers_in
from .records import JsonListWriter, load_records
from llava_jp.files import write_json

_PROTECTED = re.compile("|".join([
    r"```.*?```",                                                  # fenced code
    r"`[^`\n]+`",                                                  # inline code
    re.escape(IMAGE_TAG),
    r"\[\s*-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?)+\s*\]",       # boxes: [0.12, 0.55, 0.40, 0.98]
    r"https?://[^\s)\]]+",
]), re.DOTALL)
_PLACEHOLDER = re.compile(r"⟦(\d+)⟧")
# A translation may run this much shorter / longer (in characters) than its English source.
MIN_LENGTH_RATIO, MAX_LENGTH_RATIO = 0.15, 2.5
# Names and brands are often correctly left as they are; accept that for texts this short.
_MAX_WORDS_KEPT_AS_IS = 4


def mask(text: str) -> tuple[str, list[str]]:
    """Replaces protected spans with numbered placeholders; returns (masked text, spans)."""
    spans: list[str] = []

    def placeholder(match: re.Match) -> str:
        spans.append(match.group(0))
        return f"⟦{len(spans) - 1}⟧"

    return _PROTECTED.sub(placeholder, text), spans


def unmask(text: str, spans: list[str]) -> str:
    return _PLACEHOLDER.sub(lambda m: spans[int(m.group(1))], text)


def _body(masked: str) -> str:
    return _PLACEHOLDER.sub("", masked).strip()


def needs_translation(text: str) -> bool:
    """False for texts with no letters outside protected spans (they are copied as is)."""
    return any(c.isalpha() for c in _body(mask(text)[0]))


def rejection_reason(masked_source: str, n_spans: int, output: str,
                     min_japanese_share: float = DEFAULT_MIN_JAPANESE_SHARE) -> str | None:
    """Why `output` is not an acceptable translation of `masked_source`; None when it is."""
    if not output.strip():
        return "empty"
    if sorted(int(i) for i in _PLACEHOLDER.findall(output)) != list(range(n_spans)):
        return "placeholders changed"
    if output.strip().count("\n") != masked_source.strip().count("\n"):
        return "line breaks changed"
    source, body = _body(masked_source), _body(output)
    if Counter(numbers_in(source)) - Counter(numbers_in(body)):
        return "numbers lost"
    if body == source and len(source.split()) <= _MAX_WORDS_KEPT_AS_IS:
        return None
    share = japanese_share(body)
    if share is None or share < min_japanese_share:
        return "not Japanese"
    if not MIN_LENGTH_RATIO * len(source) - 2 <= len(body) <= MAX_LENGTH_RATIO * len(source) + 10:
        return "implausible length"
    return None


class Backend(Protocol):
    name: str
    batch_size: int

    def translate(self, texts: list[str], attempt: int) -> list[str]:
        """Masked English texts -> raw Japanese outputs (same order); may raise on errors."""


class TranslationCache:
    """Append-only JSONL of accepted translations, keyed by the SHA-256 of the source text."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                # A run killed mid-write leaves a partial last line: drop it before appending.
                raw = raw[:raw.rfind(b"\n") + 1]
                self.path.write_bytes(raw)
            for line in raw.decode("utf-8").splitlines():
                entry = json.loads(line)
                self._entries[entry["key"]] = entry["out"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    @staticmethod
    def key(source: str) -> str:
        return hashlib.sha256(source.encode("utf-8")).hexdigest()

    def get(self, source: str) -> str | None:
        return self._entries.get(self.key(source))

    def __len__(self) -> int:
        return len(self._entries)

    def put_many(self, translations: dict[str, str], model: str) -> None:
        if not translations:
            return
        with self._lock:
            for source, out in translations.items():
                self._entries[self.key(source)] = out
                self._file.write(json.dumps({"key": self.key(source), "model": model,
                                             "src": source, "out": out}, ensure_ascii=False) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


@dataclass
class Failure:
    reason: str
    output: str | None = None


def _translate_batch(sources: list[str], backend: Backend, cache: TranslationCache,
                     retries: int, retry_wait: float) -> dict[str, Failure]:
    pending = {src: mask(src) for src in sources}
    failures: dict[str, Failure] = {}
    for attempt in range(retries + 1):
        if attempt and retry_wait:
            time.sleep(retry_wait * 2 ** (attempt - 1))
        texts = list(pending)
        try:
            outputs = backend.translate([pending[src][0] for src in texts], attempt)
            if len(outputs) != len(texts):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(texts)}")
        except Exception as err:  # network, HTTP status, malformed reply: all worth a retry
            failures = {src: Failure(f"request failed: {err}") for src in texts}
            continue
        accepted = {}
        for src, out in zip(texts, outputs):
            masked, spans = pending[src]
            reason = rejection_reason(masked, len(spans), out)
            if reason is None:
                accepted[src] = unmask(out.strip(), spans)
            else:
                failures[src] = Failure(reason, out)
        cache.put_many(accepted, backend.name)
        for src in accepted:
            pending.pop(src)
            failures.pop(src, None)
        if not pending:
            break
    return failures


def translate_texts(texts: Iterable[str], backend: Backend, cache: TranslationCache,
                    workers: int = 1, retries: int = 3,
                    retry_wait: float = 1.0) -> dict[str, Failure]:
    """Translates every distinct text not already cached; returns the ones that failed."""
    todo = [t for t in dict.fromkeys(texts) if needs_translation(t) and cache.get(t) is None]
    batches = iter([todo[i:i + backend.batch_size]
                    for i in range(0, len(todo), backend.batch_size)])
    failures: dict[str, Failure] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(todo), desc="translate", unit="text") as bar:
        in_flight: dict = {}

        def refill() -> None:
            for batch in batches:
                in_flight[pool.submit(_translate_batch, batch, backend, cache, retries,
                                      retry_wait)] = len(batch)
                if len(in_flight) >= 2 * workers:
                    return

        try:
            refill()
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    bar.update(in_flight.pop(future))
                    failures.update(future.result())
                refill()
        except BaseException:
            # Ctrl-C: requests already sent finish (and are cached); queued ones never start.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return failures


def translate_dataset(source: str, out: str, backend: Backend, cache_path: str,
                      failed_path: str, workers: int = 1, retries: int = 3,
                      retry_wait: float = 1.0) -> dict:
    """Translates every turn of every sample; writes complete samples to `out`, the rest to
    `failed_path`. Returns the counts."""
    samples = load_records(source)
    malformed = {i for i, s in enumerate(samples)
                 if not isinstance(s, dict) or not isinstance(s.get("conversations"), list)
                 or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                            for t in s["conversations"])}
    texts = [t["value"] for i, s in enumerate(samples) if i not in malformed
             for t in s["conversations"]]
    cache = TranslationCache(cache_path)
    cached_before = sum(1 for t in set(texts) if cache.get(t) is not None)
    try:
        failures = translate_texts(texts, backend, cache, workers, retries, retry_wait)
        items = [{"index": i, "id": samples[i].get("id") if isinstance(samples[i], dict) else None,
                  "turn": None, "reason": "malformed_sample"} for i in sorted(malformed)]
        with JsonListWriter(out) as writer:
            for i, sample in enumerate(samples):
                if i in malformed:
                    continue
                turns, failed = [], []
                for j, turn in enumerate(sample["conversations"]):
                    src = turn["value"]
                    ja = cache.get(src) if needs_translation(src) else src
                    if ja is None:
                        fail = failures.get(src, Failure("not translated"))
                        failed.append({"index": i, "id": sample.get("id"), "turn": j,
                                       "source": src, **asdict(fail)})
                    turns.append({**turn, "value": ja})
                if failed:
                    items.extend(failed)
                else:
                    writer.write({**sample, "conversations": turns})
    finally:
        cache.close()
    unique = set(texts)
    report = {
        "samples_in": len(samples),
        "samples_written": writer.count,
        "samples_failed": len(samples) - writer.count,
        "texts_unique": len(unique),
        "texts_copied_as_is": sum(1 for t in unique if not needs_translation(t)),
        "texts_from_cache": cached_before,
        "texts_failed": len(failures),
        "failure_reasons": dict(Counter(f.reason.split(":")[0] for f in failures.values())),
    }
    write_json(Path(failed_path), {**report, "items": items})
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="English LLaVA-format .json/.jsonl/.parquet or hub id")
    parser.add_argument("--out", required=True, help="translated JSON list")
    parser.add_argument("--cache", help="translation cache (default: OUT.cache.jsonl)")
    parser.add_argument("--failed", help="report of what failed (default: OUT.failed.json)")
    parser.add_argument("--backend", choices=["openai", "transformers"], default="openai")
    parser.add_argument("--model", required=True,
                        help="API model name, or a local path / hub id for transformers")
    parser.add_argument("--api-base", default="https://api.openai.com/v1",
                        help="OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per API request")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=8, help="concurrent API requests")
    parser.add_argument("--batch-size", type=int,
                        help="texts per request / generate call (default: 1 API, 8 local)")
    parser.add_argument("--retries", type=int, default=3, help="retries per rejected text")
    parser.add_argument("--retry-wait", type=float, default=2.0,
                        help="seconds before the first retry, doubled each time")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="local backend")
    parser.add_argument("--device", help="local backend: torch device (default: cuda if available)")
    parser.add_argument("--forced-bos-token",
                        help="local seq2seq backend: target-language token, e.g. jpn_Jpan (NLLB)")


def run(args: argparse.Namespace) -> int:
    from .backends import OpenAIChatBackend, TransformersBackend

    if args.backend == "openai":
        backend = OpenAIChatBackend(args.api_base, args.model, os.environ.get(args.api_key_env),
                                    batch_size=args.batch_size or 1, timeout=args.timeout,
                                    temperature=args.temperature)
        workers = args.workers
    else:
        backend = TransformersBackend(args.model, batch_size=args.batch_size or 8,
                                      max_new_tokens=args.max_new_tokens, device=args.device,
                                      forced_bos_token=args.forced_bos_token)
        workers = 1
    cache = args.cache or f"{args.out}.cache.jsonl"
    try:
        report = translate_dataset(args.source, args.out, backend, cache,
                                   args.failed or f"{args.out}.failed.json",
                                   workers, args.retries, args.retry_wait)
    except KeyboardInterrupt:
        print(f"interrupted: translations so far are kept in {cache}; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    print(json.dumps(report, ensure_ascii=False, indent=2), file=sys.stderr)
    return 1 if report["samples_failed"] else 0
