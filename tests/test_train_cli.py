"""`llava-jp train`'s command line: HfArgumentParser over TrainConfig, YAML + overrides, LLaVA's
TrainingArguments names as aliases, one-line errors with the closest key."""

import dataclasses

import pytest

from llava_jp.cli import main as cli_main
from llava_jp.errors import UserError
from llava_jp.train.config import TrainConfig, load_config


def test_help_lists_every_key_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
        assert f.metadata.get("help") and " ".join(f.metadata["help"].split()) in text, f.name
    assert "[int, default: 8]" in text and "[float, default: 2e-05]" in text and "[bool, default: False]" in text
    assert "--config" in text and "--resume" in text


LLAVA_FLAGS = [  # (LLaVA / TrainingArguments argv, field, expected value)
    (["--per_device_train_batch_size", "4"], "per_device_batch_size", 4),
    (["--num_train_epochs", "2"], "num_epochs", 2.0),
    (["--lr_scheduler_type", "linear"], "lr_scheduler", "linear"),
    (["--model_max_length", "2048"], "max_length", 2048),
    (["--bf16", "True"], "mixed_precision", "bf16"),
    (["--bf16"], "mixed_precision", "bf16"),
    (["--version", "plain"], "template", "plain"),
    (["--pretrain_mm_mlp_adapter", "stage1/projector.safetensors"], "pretrained_projector", "stage1/projector.safetensors"),
    (["--mm_projector_lr", "2e-5"], "projector_lr", 2e-5),
]


@pytest.mark.parametrize("argv,field,value", LLAVA_FLAGS)
def test_llava_flag_names_are_aliases(argv, field, value):
    cfg = load_config(None, ["--preset", "tiny", "--data_path", "x.json", *argv])
    assert getattr(cfg, field) == value


def test_bf16_false_keeps_the_yaml_precision():
    assert load_config("stage2", ["--bf16", "false"]).mixed_precision == "bf16"  # the YAML's
    assert load_config(None, ["--preset", "tiny", "--data_path", "x", "--bf16", "false"]).mixed_precision == "no"


def test_deepspeed_points_at_the_accelerate_config(capsys):
    assert cli_main(["train", "--config", "stage2", "--deepspeed", "scripts/zero3.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--deepspeed" in err[0] and "accelerate launch --config_file" in err[0]


def test_yaml_then_flags_then_keywords(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: tiny\ndata_path: a.json\nlearning_rate: 1e-3\nstage: 1\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["--learning_rate", "5e-4"], seed=7)
    assert (cfg.learning_rate, cfg.stage, cfg.seed, cfg.preset) == (5e-4, 1, 7, "tiny")
    (tmp_path / "typo.yaml").write_text("preset: tiny\ndata_path: a.json\nper_device_batch_size: many\n")
    with pytest.raises(UserError, match=r"typo.yaml: per_device_batch_size: expected int, got 'many'"):
        load_config(str(tmp_path / "typo.yaml"))


def test_unknown_key_names_the_closest(capsys):
    assert cli_main(["train", "--config", "stage2", "--gradient_acumulation_steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llava-jp train: error: unknown option --gradient_acumulation_steps; "
                   "did you mean --gradient_accumulation_steps?"]
    with pytest.raises(UserError, match="did you mean learning_rate"):
        load_config(None, preset="tiny", data_path="x", learnin_rate=1.0)
