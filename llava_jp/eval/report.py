"""Results next to the published numbers: ``scores.json``, a markdown table, a radar chart."""

from __future__ import annotations

import json
from pathlib import Path

# Column order of the table and axes of the radar chart.
BENCHMARKS = {
    "ja-vg-vqa-500": "JA-VG-VQA-500 ROUGE-L",
    "ja-vlm-bench-in-the-wild": "JA-VLM-Bench-In-the-Wild ROUGE-L",
    "heron-bench": "Heron-Bench avg",
}

# Published scores (MISSION.md): model, params, then one score per BENCHMARKS column (None: n/a).
_PUBLISHED_ROWS = [
    ("llava-jp-1.3b-v1.1 (S2)", "1.86B", 13.33, 44.40, 50.39),
    ("llava-jp-1.3b-v1.0 (no S2)", "1.86B", 12.69, 44.58, 44.84),
    ("EvoVLM-JP-v1-7B", "7.57B", 19.70, 51.25, 45.07),
    ("Heron GIT-7B", "7.32B", 15.18, 37.82, 46.83),
    # llm-jp-eval-mm leaderboard: Heron-Bench only, judged with that harness's prompt.
    ("InternVL3-2B (llm-jp-eval-mm)", "", None, None, 55.28),
    ("Qwen2.5-VL-3B (llm-jp-eval-mm)", "", None, None, 60.72),
    ("Heron-NVILA-Lite-2B (llm-jp-eval-mm)", "", None, None, 63.22),
]
PUBLISHED: dict[str, tuple[str, dict[str, float]]] = {
    model: (params, {task: v for task, v in zip(BENCHMARKS, values) if v is not None})
    for model, params, *values in _PUBLISHED_ROWS
}


def write_scores_json(scores: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "scores.json"
    path.write_text(json.dumps(scores, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def headline(scores: dict) -> dict[str, float]:
    """Task -> headline score, for the tasks that were scored."""
    return {
        task: result["score"]
        for task, result in scores.get("tasks", {}).items()
        if task in BENCHMARKS and result.get("score") is not None
    }


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(scores: dict) -> str:
    """Our model's row in bold above the published rows, one column per benchmark (when one of
    them ran), then every task with its judge column, then own data per question type."""
    if not any(task in BENCHMARKS for task in scores.get("tasks", {})):
        return all_tasks_table(scores).lstrip("\n") + own_data_tables(scores)
    ours = headline(scores)
    header = "| model | params | " + " | ".join(BENCHMARKS.values()) + " |"
    lines = [header, "|" + "---|" * (len(BENCHMARKS) + 2)]
    name = scores.get("model", "ours")
    lines.append(
        f"| **{name}** | {scores.get('params', '')} | "
        + " | ".join(f"**{_cell(ours.get(t))}**" for t in BENCHMARKS)
        + " |"
    )
    for model, (params, published) in PUBLISHED.items():
        lines.append(
            f"| {model} | {params} | " + " | ".join(_cell(published.get(t)) for t in BENCHMARKS) + " |"
        )
    notes = [
        f"ROUGE-L protocol: {scores.get('protocol', 'llm-jp-eval-mm')}.",
        (
            "Heron-Bench: 100 x mean(model score) / mean(GPT-4 reference score) per category, "
            "averaged over conv/detail/complex; judge-dependent."
        ),
    ]
    heron = scores.get("tasks", {}).get("heron-bench", {})
    if heron.get("judge_model"):
        notes.append(
            f"Our Heron-Bench judge: {heron['judge_model']} ({heron.get('style')} prompt), "
            f"{heron.get('unparseable', 0)} unparseable judgment(s) excluded."
        )
    return (
        "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        + all_tasks_table(scores) + own_data_tables(scores)
    )


_METRIC_LABELS = {
    "rouge-l": "ROUGE-L",
    "heron-bench": "Heron-Bench rel.",
    "jmmmu": "accuracy (0-1)",
    "jdocqa": "JDocQA score (0-1)",
    "mecha-ja": "accuracy (0-1)",
    "own": "ROUGE-L",
}


def _generation(result: dict) -> str:
    g = result.get("generation")
    if not g:
        return ""
    mode = "sampling" if g.get("do_sample") else "greedy"
    return f"{mode}, max_new_tokens {g.get('max_new_tokens')}"


def all_tasks_table(scores: dict) -> str:
    """Every task's headline next to the LLM judge (1-5) the llm-jp-eval-mm leaderboard shows,
    with the generation settings that produced the answers."""
    tasks = scores.get("tasks", {})
    if not tasks:
        return ""
    lines = [
        "\n| task | metric | score | LLM judge (1-5) | generation |",
        "|---|---|---|---|---|",
    ]
    for name, result in tasks.items():
        label = _METRIC_LABELS.get(result.get("metric"), result.get("metric", ""))
        if result.get("metric") == "heron-bench" and result.get("style"):
            label += f" ({result['style']} prompt)"
        judge = result.get("llm_judge", {}).get("score")
        lines.append(
            f"| {name} | {label} | {_cell(result.get('score'))} | {_cell(judge)} | {_generation(result)} |"
        )
    return "\n".join(lines) + "\n"


def own_data_tables(scores: dict) -> str:
    """Per question type: exact match, ROUGE-L and (if judged) the 1-5 judge, for own data."""
    parts = []
    for name, result in scores.get("tasks", {}).items():
        by_type = result.get("by_type")
        if result.get("metric") != "own" or not by_type:
            continue
        judged = "llm_judge" in by_type
        header = "| type | samples | exact match | ROUGE-L |" + (" LLM judge (1-5) |" if judged else "")
        title = (f"\n{name}: exact match {_cell(result.get('exact_match'))}, "
                 f"ROUGE-L {_cell(result.get('score'))}\n")
        lines = [title, header,
                 "|---|---|---|---|" + ("---|" if judged else "")]
        for kind, rouge in by_type["rouge_l"].items():
            row = (f"| {kind} | {rouge['samples']} | {_cell(by_type['exact_match'][kind]['mean'])} "
                   f"| {_cell(rouge['mean'])} |")
            if judged:
                row += f" {_cell(by_type['llm_judge'].get(kind, {}).get('mean'))} |"
            lines.append(row)
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def radar_chart(scores: dict, path: str | Path) -> Path:
    """Radar chart of our scores vs every published model scored on all three benchmarks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(BENCHMARKS)
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False).tolist()
    ours = headline(scores)
    series = [(scores.get("model", "ours"), [ours.get(t, 0.0) for t in tasks], 2.5)]
    series += [
        (model, [published[t] for t in tasks], 1.2)
        for model, (_, published) in PUBLISHED.items()
        if all(t in published for t in tasks)
    ]
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for label, values, width in series:
        ax.plot(angles + angles[:1], values + values[:1], linewidth=width, label=label)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([BENCHMARKS[t] for t in tasks], fontsize=8)
    top = max(60.0, max(v for _, values, _ in series for v in values) * 1.1)
    ax.set_ylim(0, top)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    missing = [BENCHMARKS[t] for t in tasks if t not in ours]
    if missing:
        ax.set_title("not scored (plotted as 0): " + ", ".join(missing), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(scores: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``scores.json``, ``results.md`` and ``radar.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    table = out_dir / "results.md"
    table.write_text(markdown_table(scores), encoding="utf-8")
    written = {"scores": write_scores_json(scores, out_dir), "table": table}
    if any(task in BENCHMARKS for task in scores.get("tasks", {})):  # nothing to compare otherwise
        written["radar"] = radar_chart(scores, out_dir / "radar.png")
    return written
