"""Evaluation on the Japanese VLM benchmarks with the community's exact scoring.

- :func:`rouge_l` — Japanese ROUGE-L (llm-jp-eval-mm or Sakana protocol)
- :func:`load_task` / :data:`TASKS` — JA-VG-VQA-500, JA-VLM-Bench-In-the-Wild, Heron-Bench
- :class:`JudgeClient`, :func:`judge_heron`, :func:`judge_one_to_five` — LLM judges
- :func:`run_eval` — generate (resumably), score, write scores.json / results.md / radar.png
"""

from llava_jp.eval.judge import JudgeClient, judge_heron, judge_one_to_five
from llava_jp.eval.rouge import rouge_l, rouge_l_scores
from llava_jp.eval.runner import add_eval_arguments, main_eval, run_eval
from llava_jp.eval.tasks import TASKS, EvalTask, Sample, load_task

__all__ = [
    "TASKS",
    "EvalTask",
    "JudgeClient",
    "Sample",
    "add_eval_arguments",
    "judge_heron",
    "judge_one_to_five",
    "load_task",
    "main_eval",
    "rouge_l",
    "rouge_l_scores",
    "run_eval",
]
