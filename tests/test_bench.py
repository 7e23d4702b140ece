import json

import torch

from benchmarks.bench import bench_size, build_ours, build_peer, for_peer, make_batch
from llava_jp.cli import main

RATIOS = ("train_step_ratio", "stage1_step_ratio", "stage1_cache_speedup", "generate_tps_ratio")


def test_bench_json_has_the_ratios_and_both_sides_compute_the_same_loss(capsys):
    assert main(["bench", "--size", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["torch_threads"] == 1 and set(report["by_threads"]) == {"1", "2"}
    assert report["by_threads"]["1"]["train_step_ratio"] == report["train_step_ratio"]
    for key in RATIOS:
        assert report["by_threads"]["2"][key] > 0, key
    for key in RATIOS:
        assert report[key] > 0, key
    assert set(report["paired"]) == {"train_step_ratio", "stage1_step_ratio", "stage1_cache_speedup"}
    assert set(report["cpu_time"]) == {*report["paired"], "generate_total_ratio"}
    assert all(v > 0 for v in report["by_threads"]["2"]["cpu_time"].values())
    vocab = report["size"]["language_model"]["vocab_size"]
    for stage in ("stage1", "stage2"):
        check = report[stage]["loss_check"]
        # the peer's softmax has one more entry (`<image>`, zero head row): its loss is higher by ~1/vocab
        assert 0 <= check["peer"] - check["ours"] < 2 / vocab, check
        assert set(report[stage]["median_s"]) >= {"ours", "peer", "ours_s2"}
    assert set(report["stage1"]["median_s"]) >= {"ours_cached", "ours_s2_cached"}
    assert report["generate"]["same_tokens_as_peer"]
    assert report["generate"]["ours"]["decode_tokens_per_s"] > 0


def test_peer_shares_our_weights_and_sees_image_as_a_vocabulary_token():
    size = bench_size("tiny")
    torch.manual_seed(0)
    ours = build_ours(size, s2=False)
    peer = build_peer(ours)
    assert peer.model.vision_tower is ours.vision_tower
    assert peer.model.language_model.h is ours.language_model.base_model.h
    vocab = ours.config.text_config.vocab_size
    assert peer.lm_head.weight.shape[0] == vocab + 1 and not peer.lm_head.weight[vocab].any()
    batch = make_batch(size, 2, ours, seed=0)
    peer_batch = for_peer(batch, ours)
    assert (peer_batch["input_ids"] == vocab).sum() == (batch["input_ids"] == ours.config.image_token_id).sum() > 0
    with torch.no_grad():
        mine = ours(**batch).loss
        theirs = peer(**peer_batch).loss
        # the same computation once the `<image>` row is dropped from the peer's logits
        hidden = peer.model(**{k: v for k, v in peer_batch.items() if k != "labels"}).last_hidden_state
        logits = peer.lm_head(hidden)[..., :vocab]
        targets = batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets.reshape(-1))
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
    assert theirs > mine


def test_memory_step_counts_weights_gradients_and_optimizer_state():
    from benchmarks.memory import memory_step

    report = memory_step(torch.device("cpu"), "fp32", seq_len=128, preset_name="tiny")
    live, gib = report["live_tensor_gib"], 2**30
    trainable = report["trainable_parameters"]
    embedding_rows = 50257 * 128 + 512 * 128  # GPT-2 wte + wpe: 32-bit AdamW state (8 B per value)
    state = (embedding_rows * 8 + (trainable - embedding_rows) * 2) / gib  # others: 8-bit (2 B)
    assert abs(live["after_optimizer_step"] - live["after_backward"] - state) < 0.05 * state
    assert live["after_backward"] - live["model_and_batch"] > 0.9 * trainable * 4 / gib  # fp32 gradients
    assert report["peak_tensor_gib"] >= live["after_optimizer_step"] and report["loss"] == report["loss"]


def test_memory_step_runs_stage1_at_a_batch_from_cached_features():
    from benchmarks.memory import memory_step

    report = memory_step(torch.device("cpu"), "fp32", preset_name="tiny", stage=1, batch=2,
                         gradient_checkpointing=True, cached_features=True, lm_layers=1)
    assert report["stage"] == 1 and report["batch"] == 2 and report["lm_layers"] == 1
    assert report["seq_len"] == 16 + 40 and report["supervised_tokens"] == 2 * 40
    assert report["gradient_checkpointing"] is True and report["cached_features"] is True
    assert report["peak_tensor_gib"] > report["live_tensor_gib"]["model_and_batch"]


def test_bench_threads_flag_takes_counts_or_all_and_refuses_others(capsys):
    import os

    from benchmarks.bench import thread_counts

    assert thread_counts(["1", "all"]) == [1, len(os.sched_getaffinity(0))]
    assert main(["bench", "--size", "tiny", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_bench_times_token_compression_on_the_same_text(capsys):
    assert main(["bench", "--size", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--only", "stage1",
                 "--pixel-shuffle", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["stage1_pixel_shuffle_speedup"] > 0
    assert report["by_threads"]["1"]["stage1_pixel_shuffle_speedup"] == report["stage1_pixel_shuffle_speedup"]
    assert "ours_s2_shuffled" in report["stage1"]["median_s"]
