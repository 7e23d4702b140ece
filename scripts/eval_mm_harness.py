"""Run a llava-jp model through the released llm-jp-eval-mm harness (PyPI ``eval-mm`` 0.4.1).

Runs in the harness's own environment (Python >= 3.12, ``datasets==2.18.0``, no torch needed)
and imports nothing from llava-jp. It does what the harness's ``examples/sample.py`` (tag
v0.4.1, not part of the PyPI package) does -- same arguments, same defaults, same result files
``<result_dir>/<task_id>/<model_id>/{prediction,evaluation}.jsonl`` -- with the harness's own
task classes, scorers and judge client. Only generation happens elsewhere: each
``model.generate(images, text, gen_kwargs)`` call is sent as one JSON line to
``python -m llava_jp.eval.llm_jp_eval_mm MODEL_ID`` running under ``--llava_jp_python``
(llava-jp's environment), which answers through llava-jp's adapter class.

``--data PATH`` reads the task's hub dataset from a local parquet file or folder instead (for
JMMMU, a folder with one sub-folder per subject), through the harness's own ``_prepare_dataset``.

    /path/to/eval-mm-venv/bin/python scripts/eval_mm_harness.py \\
        --llava_jp_python "$(which python)" --model_id runs/stage2 \\
        --task_id ja-vg-vqa-500 --metrics llm-as-a-judge rougel
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import eval_mm
import eval_mm.metrics


@dataclass
class GenerationConfig:
    """``examples/utils.py`` of the harness (v0.4.1): fields and defaults."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    do_sample: bool = False
    use_cache: bool = True


def parse_args(argv=None):
    """``examples/sample.py``'s arguments and defaults, plus --llava_jp_python, --device, --data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_id", required=True, help="llava-jp model folder (relative!) or hub id")
    parser.add_argument("--task_id", default="japanese-heron-bench",
                        help=f"one of {eval_mm.TaskRegistry().get_task_list()}")
    parser.add_argument("--judge_model", default="gpt-4o-2024-11-20")
    parser.add_argument("--batch_size_for_evaluation", type=int, default=10)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--result_dir", default="result")
    parser.add_argument("--inference_only", action="store_true")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--do_sample", action="store_true", default=False)
    parser.add_argument("--use_cache", action="store_true", default=True)
    parser.add_argument("--max_dataset_len", type=int)
    parser.add_argument("--metrics", type=str, nargs="+", default=["heron-bench"],
                        help=f"any of {eval_mm.ScorerRegistry().get_metric_list()}")
    parser.add_argument("--rotate_choices", action="store_true", help="MECHA-ja")
    parser.add_argument("--random_choice", action="store_true", help="JMMMU/MMMU parse errors")
    parser.add_argument("--llava_jp_python", required=True, help="python of llava-jp's environment")
    parser.add_argument("--device", default=None, help="torch device for llava-jp (default: cuda if any)")
    parser.add_argument("--data", default=None, help="local parquet file/folder for the task's dataset")
    args = parser.parse_args(argv)
    if Path(args.model_id).is_absolute():
        parser.error("--model_id must be relative: the harness writes to <result_dir>/<task_id>/<model_id>, "
                     "so an absolute path would write into the model folder")
    return args


def _local_loader(root: Path):
    """``load_dataset`` / ``get_dataset_config_names`` stand-ins reading parquet under ``root``."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    def files(split: str, name: str | None) -> list[str]:
        base = root if name is None else root / name
        if base.is_file():
            return [str(base)]
        found = sorted(base.rglob("*.parquet"))
        chosen = [f for f in found if f.name.startswith(f"{split}-") or f.parent.name == split
                  or f.stem == split]
        if not chosen:
            sys.exit(f"--data {root}: no parquet file for split {split!r} under {base}")
        return [str(f) for f in chosen]

    def load_dataset(path, name=None, split=None, **kwargs):
        # Without the files' feature metadata: files written by a newer `datasets` than the
        # harness's 2.18 name types it cannot read. Image columns are recognised by their
        # {bytes, path} struct and decoded to PIL images as the hub loader would.
        table = pa.concat_tables([pq.read_table(f) for f in files(split, name)], promote_options="default")
        dataset = datasets.Dataset(table.replace_schema_metadata(None))
        for column, kind in zip(table.schema.names, table.schema.types):
            if pa.types.is_struct(kind) and {f.name for f in kind} == {"bytes", "path"}:
                dataset = dataset.cast_column(column, datasets.Image())
        return dataset

    def get_dataset_config_names(path, **kwargs):
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    return load_dataset, get_dataset_config_names


def load_task(args):
    """The harness's task, its hub dataset replaced by ``--data`` when given."""
    task_class = eval_mm.TaskRegistry._tasks[args.task_id]
    if args.data:
        module = sys.modules[task_class.__module__]
        load_dataset, config_names = _local_loader(Path(args.data))
        module.load_dataset = load_dataset
        if hasattr(module, "get_dataset_config_names"):
            module.get_dataset_config_names = config_names
    config = eval_mm.TaskConfig(max_dataset_len=args.max_dataset_len, rotate_choices=args.rotate_choices)
    return eval_mm.TaskRegistry.load_task(args.task_id, config)


class LlavaJpProcess:
    """The model, answering in llava-jp's environment: one JSON line out, one JSON line back."""

    def __init__(self, python: str, model_id: str, device: str | None):
        command = [python, "-m", "llava_jp.eval.llm_jp_eval_mm", model_id] + ([device] if device else [])
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, encoding="utf-8")
        self.images = tempfile.TemporaryDirectory(prefix="eval-mm-images-")
        ready = self._read()
        if "ready" not in ready:
            raise RuntimeError(f"llava-jp did not start: {ready}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llava-jp process exited (status {self.proc.wait()})")
        return json.loads(line)

    def generate(self, images, text: str, gen_kwargs: GenerationConfig) -> str:
        paths = []
        for image in images or []:
            # PNG: lossless, so llava-jp sees exactly the harness's pixels
            paths.append(os.path.join(self.images.name, f"{len(paths)}.png"))
            image.save(paths[-1])
        request = {"images": paths, "text": text, "gen_kwargs": asdict(gen_kwargs)}
        self.proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["text"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.images.cleanup()


def save_jsonl(path, data):
    with open(path, "w") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in data)


def load_or_generate_predictions(args, task, gen_kwargs, output_dir):
    """``examples/sample.py``: reuse prediction.jsonl unless --overwrite; errors recorded."""
    prediction_path = os.path.join(output_dir, "prediction.jsonl")
    if os.path.exists(prediction_path) and not args.overwrite:
        with open(prediction_path) as f:
            preds = [json.loads(line) for line in f]
        assert len(preds) == len(task.dataset), "Prediction length mismatch with dataset"
        return preds, []
    model = LlavaJpProcess(args.llava_jp_python, args.model_id, args.device)
    preds, errors = [], []
    try:
        for doc in task.dataset:
            qid = task.doc_to_id(doc)
            images = task.doc_to_visual(doc)
            text = task.doc_to_text(doc).replace("<image>", "")
            try:
                generated_text = model.generate(images, text, gen_kwargs)
            except RuntimeError as e:
                generated_text = ""
                errors.append({"question_id": qid, "error": str(e)})
            preds.append({"question_id": qid, "text": generated_text})
            if len(errors) > len(task.dataset) * 0.1:
                save_jsonl(os.path.join(output_dir, "error_message.jsonl"), errors)
                sys.exit("Error count exceeded 10%. Terminating.")
    finally:
        model.close()
    save_jsonl(prediction_path, preds)
    if errors:
        save_jsonl(os.path.join(output_dir, "error_message.jsonl"), errors)
    return preds, errors


def evaluate(args, task, preds, metrics):
    """``examples/sample.py``: every metric's per-sample scores and aggregate."""
    scores_by_metric, aggregated_metrics = {}, {}
    for metric in metrics:
        scorer = eval_mm.ScorerRegistry.load_scorer(
            metric,
            eval_mm.ScorerConfig(
                docs=task.dataset,
                judge_model=args.judge_model,
                batch_size=args.batch_size_for_evaluation,
                client=eval_mm.OpenAIChatAPI(),
                random_choice=args.random_choice,
            ),
        )
        scores = scorer.score([task.doc_to_answer(doc) for doc in task.dataset], [p["text"] for p in preds])
        scores_by_metric[metric] = scores
        aggregated_metrics[metric] = asdict(scorer.aggregate(scores))
    return scores_by_metric, aggregated_metrics


def main(argv=None):
    args = parse_args(argv)
    gen_kwargs = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, num_beams=args.num_beams,
                                  do_sample=args.do_sample, use_cache=args.use_cache)
    task = load_task(args)
    output_dir = os.path.join(args.result_dir, args.task_id, args.model_id)
    os.makedirs(output_dir, exist_ok=True)
    preds, _ = load_or_generate_predictions(args, task, gen_kwargs, output_dir)
    if args.inference_only:
        return
    scores_by_metric, aggregated_metrics = evaluate(args, task, preds, args.metrics)
    final = []
    for i, pred in enumerate(preds):
        doc = task.dataset[i]
        result = {"question_id": pred["question_id"], "text": pred["text"],
                  "answer": task.doc_to_answer(doc), "input_text": task.doc_to_text(doc)}
        result.update({metric: scores_by_metric[metric][i] for metric in args.metrics})
        final.append(result)
    save_jsonl(os.path.join(output_dir, "prediction.jsonl"), final)
    with open(os.path.join(output_dir, "evaluation.jsonl"), "w") as f:
        f.write(json.dumps(aggregated_metrics, ensure_ascii=False) + "\n")
    print(json.dumps({"task_id": args.task_id, "generation": asdict(gen_kwargs), **aggregated_metrics},
                     ensure_ascii=False, default=str))


if __name__ == "__main__":
    main()
