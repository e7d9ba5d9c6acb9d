"""The committed toy VLM v2 (`--model testbed`): a lean bf16 Qwen2-VL that reads scene images, and
the pure parts of its card (baselines, caption scoring, bootstrap intervals)."""

import json
import math
import random

import pytest
import torch

from benchmarks.common import paired_difference_ci
from benchmarks.toyvlm2.card import baselines, scene_of
from tlq_vllm import scenes
from tlq_vllm.calibrate.pipeline import resolve_model
from tlq_vllm.eval.captions import caption_items, caption_nll, caption_scores, object_phrases
from tlq_vllm.paths import TESTBED_DIR


def test_testbed_is_a_lean_bf16_qwen2_vl_trained_to_the_end_of_its_schedule():
    assert resolve_model("testbed") == str(TESTBED_DIR)
    config = json.loads((TESTBED_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert (TESTBED_DIR / "model.safetensors").stat().st_size < 60 * 2**20  # issue 14: lean package data
    log = json.loads((TESTBED_DIR / "training_log.json").read_text())
    assert log["schedule_finished"] and log["step"] == log["steps"]
    train = [r["loss"] for r in log["history"] if "loss" in r]
    assert train[-1] < train[0] / 10


def test_testbed_reads_the_images_well_above_the_majority_answer():
    """350 fixed test questions (scenes whose layouts training never saw): the majority answer of
    each type, given to every question of it, scores far less than the model."""
    from transformers import AutoProcessor

    from tlq_vllm.eval import hf, load_items
    from tlq_vllm.eval.__main__ import evaluate_hf

    items = load_items("scenes", limit=350, seed=0)
    processor = AutoProcessor.from_pretrained(TESTBED_DIR)
    processor.tokenizer.padding_side = "left"
    metrics, _, _ = evaluate_hf(TESTBED_DIR, hf.encode(processor, items, progress=False), progress=False)
    base = baselines(items)
    majority = sum(base[it.type]["majority"] for it in items) / len(items)
    assert metrics["accuracy"] >= majority + 0.10, (metrics, majority)


def test_baselines_count_the_answers_of_each_type():
    from tlq_vllm.eval.vqa import VQAItem

    items = [VQAItem(f"s:{i}:{t}", TESTBED_DIR, "q", (a,), t)
             for i, (t, a) in enumerate([("exist", "yes"), ("exist", "yes"), ("exist", "no"), ("count", "3")])]
    b = baselines(items)
    assert b["exist"] == {"chance": 0.5, "majority": 2 / 3, "answers": 2}
    assert b["count"]["majority"] == 1.0 and scene_of("scenes-test:17:count") == "scenes-test:17"


def test_caption_scoring_splits_objects_and_scores_them():
    items = caption_items("test", 20)
    references = [it.answers[0] for it in items]
    assert caption_scores(items, references) == {"caption_exact": 1.0, "object_precision": 1.0,
                                                 "object_recall": 1.0, "object_f1": 1.0, "captions": 20}
    # each reference lists every object of its scene, one phrase each
    for i, ref in enumerate(references):
        phrases = object_phrases(ref)
        assert sum(phrases.values()) == len(scenes.sample_scene("test", i).objects), ref
        assert all(p.startswith(("a ", "an ")) and " at " in p or " in the center" in p for p in phrases), ref
    # dropping the last object of every caption: precision stays 1, recall falls by what was dropped
    cut = [r.rsplit(" and ", 1)[0] + "." for r in references]
    s = caption_scores(items, cut)
    objects = sum(sum(object_phrases(r).values()) for r in references)
    assert s["caption_exact"] == 0 and s["object_precision"] == 1.0
    assert s["object_recall"] == pytest.approx((objects - 20) / objects)


def test_caption_nll_is_the_mean_negative_log_likelihood_of_the_reference_tokens():
    lp = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), -1)
    got = caption_nll([lp], [[0, 2]])
    expected = -(float(lp[0, 0]) + float(lp[1, 2])) / 2
    assert got["caption_nll"] == pytest.approx(expected) and got["caption_tokens"] == 2
    assert got["caption_perplexity"] == pytest.approx(math.exp(expected))


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    """Independent questions (one per cluster): the percentile interval of the mean difference is
    close to mean +- 1.96 sd / sqrt(n) (tolerance 15% of the half-width, 4,000 resamples)."""
    rng = random.Random(1)
    n = 800
    base = [float(rng.random() < 0.6) for _ in range(n)]
    other = [b if rng.random() < 0.8 else float(rng.random() < 0.4) for b in base]
    ci = paired_difference_ci(base, other, list(range(n)), resamples=4000)
    diffs = [o - b for b, o in zip(base, other, strict=True)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    assert ci["diff"] == pytest.approx(mean) and ci["clusters"] == n
    assert ci["low"] == pytest.approx(mean - half, abs=0.15 * half)
    assert ci["high"] == pytest.approx(mean + half, abs=0.15 * half)


def test_paired_bootstrap_resamples_whole_clusters():
    """Ten clusters whose questions all move together: the interval is as wide as ten questions
    give, far wider than the same scores treated as 100 independent ones."""
    rng = random.Random(2)
    shifts = [rng.choice([-1.0, 0.0, 1.0]) for _ in range(10)]
    base = [0.0] * 100
    other = [shifts[i // 10] for i in range(100)]
    clustered = paired_difference_ci(base, other, [i // 10 for i in range(100)])
    independent = paired_difference_ci(base, other, list(range(100)))
    assert clustered["clusters"] == 10 and clustered["diff"] == pytest.approx(independent["diff"])
    assert clustered["high"] - clustered["low"] > 2 * (independent["high"] - independent["low"])
    with pytest.raises(ValueError):
        paired_difference_ci([0.0], [0.0, 1.0], [0, 1])


@pytest.mark.slow
def test_card_script_writes_the_card_from_what_it_measured(tmp_path):
    """The card script on a copy of the testbed, 14 questions, 4 captions, RTN W4A16 and W2A16: its
    README quotes the numbers card.json holds."""
    import shutil

    from benchmarks.toyvlm2.card import main

    model = shutil.copytree(TESTBED_DIR, tmp_path / "model")
    (model / "README.md").unlink()
    assert main(["--model", str(model), "--limit", "14", "--caption-scenes", "4", "--schemes", "W4A16,W2A16"]) == 0
    card = json.loads((model / "card.json").read_text())
    assert card["questions"] == 14 and card["fp"]["captions"]["captions"] == 4
    assert [row["scheme"] for row in card["rtn"]] == ["W4A16", "W2A16"]
    for row in card["rtn"]:
        low, diff, high = (row["difference"][k] for k in ("low", "diff", "high"))
        assert low <= diff <= high
    text = (model / "README.md").read_text()
    assert f"**{100 * card['fp']['questions']['accuracy']:.1f}%**" in text and "| W4A16 |" in text
    w2 = card["rtn"][1]["difference"]
    assert f"RTN W2A16 (group 64, the stress setting) loses {-100 * w2['diff']:.1f} points" in text
    assert main(["--model", str(tmp_path)]) == 2  # not a model directory: one error line, exit 2
