"""The hub model card (README.md) of a release: YAML metadata, Japanese and English text, and
the evaluation table from an eval `scores.json`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llava_jp.errors import UserError, read_json

PIPELINE_TAG = "image-text-to-text"
TAGS = ["llava", "llava-jp", "vision-language", "japanese", "custom_code"]
# what `trust_remote_code` imports besides transformers; the s2wrapper module's PyPI name differs
REQUIREMENTS = "pip install 'transformers>={transformers}' torch pillow einops scaling-on-scales"


@dataclass
class CardInfo:
    """Everything the card says. `model` holds the architecture summary (see `release.model_summary`)."""

    model: dict
    repo_id: str | None = None
    license: str = "apache-2.0"
    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, float]] | None = None
    verification: dict | None = None
    versions: dict[str, str] = field(default_factory=dict)


def load_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """Read an eval `scores.json`: `{"task": {"metric": number}}` (or `{"task": number}`)."""
    data = read_json(path, "--scores")
    return normalize_scores(data, source=str(path))


def normalize_scores(data: object, source: str = "scores") -> dict[str, dict[str, float]]:
    """Validate a scores mapping once, with errors that name the task and metric."""
    if not isinstance(data, dict) or not data:
        raise UserError(f"{source}: expected a non-empty mapping task -> {{metric: number}}")
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in data.items():
        if not isinstance(metrics, dict):
            metrics = {"score": metrics}
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{source}: {task}.{metric}: expected a finite number, got {value!r}")
        scores[str(task)] = {str(m): float(v) for m, v in metrics.items()}
    return scores


def front_matter(info: CardInfo) -> str:
    """The YAML metadata block the hub reads (between `---` lines)."""
    meta: dict = {
        "license": info.license,
        "language": ["ja"],
        "pipeline_tag": PIPELINE_TAG,
        "library_name": "transformers",
        "tags": TAGS,
    }
    if info.base_models:
        meta["base_model"] = list(info.base_models)
    if info.datasets:
        meta["datasets"] = list(info.datasets)
    if info.scores:
        meta["model-index"] = [{
            "name": info.repo_id or "llava-jp",
            "results": [
                {"task": {"type": PIPELINE_TAG}, "dataset": {"name": task, "type": task},
                 "metrics": [{"type": metric, "value": value} for metric, value in metrics.items()]}
                for task, metrics in info.scores.items()
            ],
        }]
    return "---\n" + yaml.safe_dump(meta, allow_unicode=True, sort_keys=False) + "---\n"


def eval_table(scores: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per (task, metric)."""
    rows = ["| タスク / Task | 指標 / Metric | スコア / Score |", "|---|---|---:|"]
    for task, metrics in scores.items():
        rows += [f"| {task} | {metric} | {value:.2f} |" for metric, value in metrics.items()]
    return "\n".join(rows) + "\n"


def _architecture_table(model: dict) -> str:
    s2 = " + ".join(str(s) for s in model["s2_scales"]) if model.get("s2_scales") else "single scale"
    rows = [
        ("vision / 画像エンコーダ", f"{model['vision']} (layer {model['vision_feature_layer']})"),
        ("resolution / 解像度", f"{model['image_size']} px, S2: {s2}"),
        ("image tokens / 画像トークン数", f"{model['image_tokens_per_image']} x {model['projector_input_width']}"),
        ("projector / プロジェクタ", model["projector"]),
        ("LM / 言語モデル", model["language_model"]),
        ("parameters / パラメータ数", model["total_human"]),
    ]
    if model.get("vision_layout", "default") != "default":
        rows.append(("vision layout", f"{model['vision_layout']} (imported checkpoint)"))
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _usage(info: CardInfo) -> str:
    name = info.repo_id or "path/to/this/folder"
    return f'''```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "この画像について説明してください。"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=Image.open("image.jpg"), text=prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
'''


def _verification(info: CardInfo) -> tuple[str, str]:
    v = info.verification
    if not v or not v.get("passed"):
        return "", ""
    env = ", ".join(f"{k} {v}" for k, v in info.versions.items())
    ja = (f"このフォルダは公開前に、llava-jp を import できないプロセスで上記の方法で読み込み、元のモデルと "
          f"greedy 生成 {v['tokens']} トークンおよび logits が完全に一致することを確認済みです (fp32, CPU, {env})。\n")
    en = (f"Before release, this folder was loaded as above in a process that cannot import llava-jp; its greedy "
          f"generation ({v['tokens']} tokens) and logits matched the source model exactly (fp32, CPU, {env}).\n")
    return ja, en


def render_model_card(info: CardInfo) -> str:
    """README.md: metadata block, then Japanese and English sections."""
    title = info.repo_id.split("/")[-1] if info.repo_id else "llava-jp model"
    requirements = REQUIREMENTS.format(transformers=info.versions.get("transformers", "5"))
    verified_ja, verified_en = _verification(info)
    scores_ja = scores_en = ""
    if info.scores:
        table = eval_table(info.scores)
        scores_ja = f"\n### 評価\n\n{table}"
        scores_en = f"\n### Evaluation\n\n{table}"
    base = ", ".join(info.base_models) or "-"
    data = ", ".join(info.datasets) or "-"
    template = f"`{info.model['template']}`: `{info.model['prompt_example']}`"
    return (
        front_matter(info)
        + f"\n# {title}\n\n"
        + f"{_architecture_table(info.model)}\n"
        + "## 日本語\n\n"
        + "LLaVA 形式の日本語画像言語モデルです。画像と日本語の質問から日本語で回答します。"
        + "llava-jp ツールキットで公開しました。\n\n"
        + f"- ベースモデル: {base}\n- 学習データ: {data}\n- プロンプト形式 {template} (processor が組み立てます)\n\n"
        + "### 使い方\n\n"
        + f"llava-jp のインストールは不要です。必要なパッケージ:\n\n```bash\n{requirements}\n```\n\n"
        + "`s2wrapper` モジュールは PyPI では `scaling-on-scales` という名前です。\n\n"
        + _usage(info) + "\n" + verified_ja + scores_ja
        + "\n## English\n\n"
        + "A LLaVA-style Japanese vision-language model: it answers Japanese questions about an image in "
        + "Japanese. Released with the llava-jp toolkit.\n\n"
        + f"- Base models: {base}\n- Training data: {data}\n- Prompt format {template} (the processor builds it)\n\n"
        + "### Usage\n\n"
        + "No llava-jp install needed; the model code ships with this repository (`trust_remote_code=True`). "
        + f"Requirements:\n\n```bash\n{requirements}\n```\n\n"
        + "The `s2wrapper` module is published on PyPI as `scaling-on-scales`.\n\n"
        + _usage(info) + "\n" + verified_en + scores_en
        + f"\n### License\n\n{info.license}\n"
    )
