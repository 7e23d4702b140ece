"""The evaluation loop behind ``llava-jp eval``: generate (resumably), score, report.

Layout of ``out_dir``::

    predictions/<task>.jsonl   one line per answered sample, appended after every batch
    details/<task>.jsonl       per-sample scores and judge verdicts (rewritten each run)
    judge_cache.jsonl          every parseable judge reply, keyed by a hash of the request
    scores.json, results.md, radar.png

A re-run skips samples whose id is already in ``predictions/`` and asks the judge only what
``judge_cache.jsonl`` does not answer, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from llava_jp.eval import harness_metrics as hm
from llava_jp.eval._jsonl import append_records, read_records
from llava_jp.eval.fingerprint import OtherModelsOutput, claim_out_dir, model_fingerprint
from llava_jp.eval.judge import HERON_STYLES, JudgeClient, Judgment, judge_heron, judge_one_to_five
from llava_jp.eval.report import write_report
from llava_jp.eval.rouge import PROTOCOLS, aggregate_rouge_l, rouge_l_scores
from llava_jp.eval.tasks import DEFAULT_TASKS, TASKS, EvalTask, load_own_data, load_task
from llava_jp.files import write_text

GenerateFn = Callable[[list[Image.Image], list[str]], list[str]]
logger = logging.getLogger(__name__)


def generate_predictions(
    task: EvalTask,
    generate_fn: GenerateFn,
    path: Path,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Answer every sample of ``task`` not yet in ``path``; returns answers in sample order."""
    done = {r["id"]: r["prediction"] for r in read_records(path)}
    todo = [s for s in task.samples if s.id not in done]
    with tqdm(
        total=len(task.samples),
        initial=len(task.samples) - len(todo),
        desc=task.name,
        unit="q",
        disable=not progress,
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = generate_fn([task.image(s) for s in batch], [s.question for s in batch])
            if len(answers) != len(batch) or not all(isinstance(a, str) for a in answers):
                raise ValueError(
                    f"generate_fn returned {len(answers)} answers for {len(batch)} questions "
                    "(expected one string per question)"
                )
            append_records(
                path,
                [
                    {"id": s.id, "question": s.question, "reference": s.reference, "prediction": a}
                    for s, a in zip(batch, answers)
                ],
            )
            done.update((s.id, a) for s, a in zip(batch, answers))
            bar.update(len(batch))
    return [done[s.id] for s in task.samples]


def _judgment_fields(prefix: str, judgment: Judgment) -> dict:
    return {
        prefix: judgment.value,
        f"{prefix}_error": judgment.error,
        f"{prefix}_reply": judgment.reply,
    }


def _harness_scores(task: EvalTask, predictions: Sequence[str]) -> tuple[list, dict]:
    """Per-sample scores and the summary of a task scored with llm-jp-eval-mm's own metric."""
    samples = task.samples
    if task.metric == "jmmmu":
        per_sample = [hm.jmmmu_score(s.fields, p) for s, p in zip(samples, predictions)]
        return per_sample, hm.jmmmu_aggregate([s.fields["id"] for s in samples], per_sample)
    if task.metric == "jdocqa":
        per_sample = [hm.jdocqa_score(s.fields, s.reference, p) for s, p in zip(samples, predictions)]
        return per_sample, hm.jdocqa_aggregate([s.fields["answer_type"] for s in samples], per_sample)
    per_sample = [hm.mecha_score(s.reference, p) for s, p in zip(samples, predictions)]
    return per_sample, hm.mecha_aggregate([s.fields for s in samples], per_sample)


def _by_type(samples, values: Sequence[float | None]) -> dict:
    """Mean of ``values`` per question type (``Sample.category``), None values left out."""
    groups: dict[str, list[float]] = {}
    for sample, value in zip(samples, values):
        if value is not None:
            groups.setdefault(sample.category or "(none)", []).append(value)
    return {k: {"mean": sum(v) / len(v), "samples": len(v)} for k, v in sorted(groups.items())}


def score_task(
    task: EvalTask,
    predictions: Sequence[str],
    protocol: str = "llm-jp-eval-mm",
    judge: JudgeClient | None = None,
    heron_style: str = "heron",
    llm_judge_rouge: bool = False,
) -> tuple[dict, list[dict]]:
    """(summary, per-sample details) for one task's predictions.

    ``llm_judge_rouge`` adds llm-jp-eval-mm's 1-5 judge where the leaderboard shows it
    (JA-VG-VQA-500, JA-VLM-Bench-In-the-Wild, JDocQA) and to own data.
    """
    details = [{"id": s.id, "prediction": p} for s, p in zip(task.samples, predictions)]
    if task.metric == "heron-bench":
        if judge is None:
            return {"metric": "heron-bench", "score": None, "note": "not scored: no judge configured"}, details
        summary, judgments = judge_heron(judge, task.samples, predictions, heron_style)
        for row, sample, judgment in zip(details, task.samples, judgments):
            row["category"] = sample.category
            row.update(_judgment_fields("judge_scores", judgment))
        return {"metric": "heron-bench", "samples": len(task.samples), **summary}, details

    references = [s.reference for s in task.samples]
    if task.metric in ("rouge-l", "own"):
        per_sample = rouge_l_scores(references, predictions, protocol)
        summary = {
            "metric": task.metric,
            "protocol": protocol,
            "score": aggregate_rouge_l(per_sample, protocol),
            "samples": len(per_sample),
        }
        for row, value in zip(details, per_sample):
            row["rouge_l"] = value
        if task.metric == "own":
            exact = [float(r.strip() == p.strip()) for r, p in zip(references, predictions)]
            summary["exact_match"] = 100.0 * sum(exact) / len(exact) if exact else None
            for row, sample, value in zip(details, task.samples, exact):
                row["exact_match"], row["type"] = value, sample.category
    else:
        per_sample, harness = _harness_scores(task, predictions)
        summary = {"metric": task.metric, **harness, "samples": len(per_sample)}
        for row, value in zip(details, per_sample):
            row["score"] = value

    judged = task.metric in ("rouge-l", "own", "jdocqa")
    if llm_judge_rouge and judge is not None and judged:
        summary["llm_judge"], judgments = judge_one_to_five(judge, task.samples, predictions)
        for row, judgment in zip(details, judgments):
            row.update(_judgment_fields("llm_judge", judgment))
    if task.metric == "own":
        summary["by_type"] = {
            "rouge_l": _by_type(task.samples, [d["rouge_l"] for d in details]),
            "exact_match": _by_type(task.samples, [100.0 * d["exact_match"] for d in details]),
        }
        if "llm_judge" in summary:
            summary["by_type"]["llm_judge"] = _by_type(task.samples, [d.get("llm_judge") for d in details])
    return summary, details


def run_eval(
    tasks: Sequence[str | EvalTask],
    generate_fn: GenerateFn,
    out_dir: str | Path,
    judge: JudgeClient | None = None,
    batch_size: int = 8,
    *,
    model_name: str = "ours",
    protocol: str = "llm-jp-eval-mm",
    sources: dict[str, str] | None = None,
    limit: int | None = None,
    heron_style: str = "heron",
    llm_judge_rouge: bool = False,
    progress: bool = True,
    generation: dict | None = None,
    fingerprint: dict | None = None,
) -> dict:
    """Generate, score and report every task; returns the ``scores.json`` content.

    ``tasks`` are names (loaded from ``sources[name]`` or the hub) or loaded :class:`EvalTask`s.
    ``generate_fn(images, questions) -> answers`` is called once per batch of ``batch_size``.
    Heron-Bench is scored only with a ``judge``; without one its predictions are still written.
    ``generation`` (the settings behind ``generate_fn``) is stated in every task's result.
    ``fingerprint`` (``eval.fingerprint.model_fingerprint``) is recorded in ``out_dir``; a folder
    that holds another model's outputs is refused (``OtherModelsOutput``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    out_dir = Path(out_dir)
    if fingerprint is not None:
        claim_out_dir(out_dir, fingerprint)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sources or {}
    names = [t if isinstance(t, str) else t.name for t in tasks]
    if judge is None and "heron-bench" in names:
        logger.warning("no judge configured: Heron-Bench answers are generated but not scored")
    scores = {"model": model_name, "protocol": protocol, "limit": limit, "tasks": {}}
    for task in tasks:
        if isinstance(task, str):
            task = load_task(task, sources.get(task), protocol=protocol, limit=limit)
        predictions = generate_predictions(
            task, generate_fn, out_dir / "predictions" / f"{task.name}.jsonl", batch_size, progress
        )
        summary, details = score_task(task, predictions, protocol, judge, heron_style, llm_judge_rouge)
        if generation is not None:
            summary["generation"] = dict(generation)
        write_text(out_dir / "details" / f"{task.name}.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
        scores["tasks"][task.name] = summary
    write_report(scores, out_dir)
    return scores


# ---- command line -------------------------------------------------------------------------


def _usage_error(message: str) -> None:
    """A user mistake: one line naming the flag or file, exit status 2, no traceback."""
    print(f"llava-jp eval: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse_sources(pairs: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``--data`` values: (TASK=SOURCE overrides, own-data JSON files)."""
    sources, own = {}, []
    for pair in pairs:
        name, sep, source = pair.partition("=")
        if not sep and pair.endswith(".json"):
            own.append(pair)
        elif not sep or name not in TASKS:
            _usage_error(
                f"--data expects TASK=SOURCE with TASK one of {sorted(TASKS)}, or a LLaVA-format "
                f".json file of your own, got {pair!r}"
            )
        else:
            sources[name] = source
    return sources, own


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``llava-jp eval``."""
    parser.add_argument("--model", required=True, help="model folder or hub id to evaluate")
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated, from {', '.join(TASKS)} (default: {', '.join(DEFAULT_TASKS)}; "
        "none when --data names your own .json file)",
    )
    parser.add_argument("--out", required=True, help="output folder (re-use it to resume)")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=SOURCE|FILE.json",
        help="load TASK from a local parquet file/folder or another hub id, or evaluate on your "
        "own LLaVA-format .json (exact match, ROUGE-L, optional judge) (repeatable)",
    )
    parser.add_argument("--image-folder", default=None,
                        help="where the images of your own .json live (default: its folder)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="llm-jp-eval-mm", help="ROUGE-L protocol")
    parser.add_argument("--limit", type=int, default=None, help="first N samples per task (smoke test)")
    parser.add_argument("--model-name", default=None, help="name in the results table")
    judge = parser.add_argument_group("judge (OpenAI-compatible chat API)")
    judge.add_argument("--judge-base-url", default=None, help="e.g. https://api.openai.com/v1 "
                       "(env LLAVA_JP_JUDGE_BASE_URL); Heron-Bench is not scored without one")
    judge.add_argument("--judge-model", default=None, help="env LLAVA_JP_JUDGE_MODEL; default gpt-4-0125-preview")
    judge.add_argument("--judge-api-key", default=None, help="env LLAVA_JP_JUDGE_API_KEY or OPENAI_API_KEY")
    judge.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    judge.add_argument("--judge-attempts", type=int, default=3, help="requests per judgment at most")
    judge.add_argument("--judge-workers", type=int, default=4, help="concurrent judge requests")
    judge.add_argument("--heron-judge-style", choices=HERON_STYLES, default="heron")
    judge.add_argument(
        "--llm-judge-rouge",
        action="store_true",
        help="also score JA-VG-VQA-500, JA-VLM-Bench-In-the-Wild, JDocQA and own data with "
        "llm-jp-eval-mm's 1-5 LLM judge (the leaderboard's headline for the first two)",
    )
    return parser


def load_model(model_path: str, device: str | None = None):
    """(model, processor) of a saved llava-jp model, in eval mode on ``device`` (default: cuda if
    any), through the one loader (bf16 on a GPU that supports it, else float32)."""
    from llava_jp.infer.load import default_device, inference_dtype
    from llava_jp.infer.load import load_model as load

    from llava_jp.errors import loading

    device = device or default_device()
    with loading(model_path, "--model"):  # a model folder / hub id, or a LoRA adapter folder
        model, processor = load(model_path, dtype=inference_dtype(device), device=device)
    return model.eval(), processor


def model_generate_fn(model_path: str, max_new_tokens: int = 256, device: str | None = None) -> GenerateFn:
    """``generate_fn`` backed by a saved llava-jp model (greedy, batched, left-padded)."""
    from llava_jp.infer.generate import generate_answers

    model, processor = load_model(model_path, device)

    def generate(images: list[Image.Image], questions: list[str]) -> list[str]:
        return generate_answers(model, processor, images, questions, max_new_tokens=max_new_tokens)

    return generate


def main_eval(args: argparse.Namespace) -> dict:
    """Run ``llava-jp eval`` from parsed :func:`add_eval_arguments` arguments."""
    sources, own_files = _parse_sources(args.data)
    if args.tasks is None:
        tasks: list = [] if own_files else list(DEFAULT_TASKS)
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        _usage_error(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    for path in own_files:
        try:
            tasks.append(load_own_data(path, args.image_folder, args.limit))
        except (OSError, ValueError) as err:
            _usage_error(f"--data {path}: {err}")
    out_dir = Path(args.out)
    judge = JudgeClient.from_env(
        args.judge_base_url,
        args.judge_model,
        args.judge_api_key,
        cache_path=out_dir / "judge_cache.jsonl",
        timeout=args.judge_timeout,
        max_attempts=args.judge_attempts,
        workers=args.judge_workers,
    )
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": False}  # what decides answers besides the files
    fingerprint = None
    if Path(args.model).is_dir():  # checked before the model loads; a hub id's files are there only after
        fingerprint = model_fingerprint(args.model, generation)
        claim_out_dir(out_dir, fingerprint)
    generate_fn = model_generate_fn(args.model, args.max_new_tokens, args.device)
    fingerprint = fingerprint or model_fingerprint(args.model, generation)
    scores = run_eval(
        tasks,
        generate_fn,
        out_dir,
        judge,
        args.batch_size,
        model_name=args.model_name or Path(args.model).name,
        protocol=args.protocol,
        sources=sources,
        limit=args.limit,
        heron_style=args.heron_judge_style,
        llm_judge_rouge=args.llm_judge_rouge,
        generation={"max_new_tokens": args.max_new_tokens, "do_sample": False, "num_beams": 1,
                    "temperature": 0.0, "batch_size": args.batch_size},
        fingerprint=fingerprint,
    )
    print((out_dir / "results.md").read_text(encoding="utf-8"))
    return scores


# `llava-jp eval` (llava_jp/cli.py routes a subcommand to `add_arguments` / `run`).
add_arguments = add_eval_arguments


def run(args: argparse.Namespace) -> int:
    try:
        main_eval(args)
    except OtherModelsOutput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
