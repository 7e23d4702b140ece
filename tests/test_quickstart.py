import json
import subprocess
import sys

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.synthetic import QUESTIONS


def test_quickstart_runs_end_to_end_and_ends_with_one_json_line(tmp_path):
    """A shrunken quickstart (the full one is a 10-minute run): same code path, tiny sizes."""
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_jp.cli", "quickstart", "--out", str(out), "--train-images", "64",
         "--test-images", "4", "--stage1-steps", "2", "--stage2-steps", "3", "--batch-size", "16"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0
    assert set(result["accuracy_by_type"]) == set(QUESTIONS)
    assert result["n_test"] == 4 * len(QUESTIONS) and result["stage2_steps"] == 3
    assert (out / "stage1" / "projector.safetensors").exists()
    model = LlavaJpForConditionalGeneration.from_pretrained(result["model_dir"])
    processor = LlavaJpProcessor.from_pretrained(result["model_dir"])
    assert model.num_image_tokens == processor.num_image_tokens == 16
