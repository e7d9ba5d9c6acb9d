"""The VQA evaluation harness (tlq_vllm.eval) and the accuracy benchmark's pure parts."""

import json
import math

import pytest
import torch

from benchmarks.accuracy import ABLATIONS, METHOD_VARIANTS, SHAPING, differences, latest_records, plan, summarize
from tlq_vllm.calibrate.data import DataError
from tlq_vllm.eval import load_items, normalize_answer, vqa_score
from tlq_vllm.eval.hf import add_activation_quantization, agreement_and_kl


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes.", "yes"), ("  The Circle! ", "circle"), ("two dogs", "2 dogs"), ("3.5", "3.5"), ("a red-ish", "red ish")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_vqa_score_is_exact_match_for_one_answer_and_min_matches_over_3_for_many():
    assert vqa_score("Circle", ["circle"]) == 1.0
    assert vqa_score("square", ["circle"]) == 0.0
    answers = ["red", "red", "dark red", "maroon", "red", "red", "crimson", "dark red", "red", "red"]
    assert vqa_score("red", answers) == 1.0
    assert vqa_score("dark red", answers) == pytest.approx(2 / 3)
    assert vqa_score("maroon", answers) == pytest.approx(1 / 3)


def test_easy_vqa_subset_is_fixed_by_limit_and_seed_and_comes_from_the_test_split():
    full = load_items("easy-vqa")
    assert len(full) == 9673 and all(it.id.startswith("easy-vqa-test:") for it in full)
    a, b = load_items("easy-vqa", limit=50, seed=0), load_items("easy-vqa", limit=50, seed=0)
    assert [it.id for it in a] == [it.id for it in b]
    assert [it.id for it in a] != [it.id for it in load_items("easy-vqa", limit=50, seed=1)]


def test_generic_jsonl_items_and_their_errors(tmp_path, sample_image):
    sample_image.save(tmp_path / "img.png")
    (tmp_path / "vqa.jsonl").write_text(
        json.dumps({"image": "img.png", "question": "what?", "answers": [{"answer": "x"}, "y"]}) + "\n"
    )
    [item] = load_items(str(tmp_path / "vqa.jsonl"))
    assert item.answers == ("x", "y") and item.image == (tmp_path / "img.png").resolve()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "img.png", "question": "what?"}) + "\n")
    with pytest.raises(DataError, match="needs image, question and answers"):
        load_items(str(tmp_path / "bad.jsonl"))


def test_agreement_and_kl_against_closed_form():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.2, 0.3]])
    out = agreement_and_kl([p.log()[:1], p.log()[1:]], [q.log()[:1], q.log()[1:]])
    kl = [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr, strict=True)) for pr, qr in zip(p.tolist(), q.tolist(),
                                                                                               strict=True)]
    assert out["mean_kl"] == pytest.approx(sum(kl) / 2, rel=1e-5)
    assert out["top1_agreement"] == 0.5 and out["answer_positions"] == 2


def test_activation_quantization_hooks_quantize_inputs_of_the_targeted_linears_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4, bias=False))
    x = torch.randn(3, 8)
    ref_first = model[0](x)
    per_token = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    config = {"ignore": ["1"], "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": per_token}}}
    assert add_activation_quantization(model, config) == 1
    q = x.abs().amax(-1, keepdim=True) / 127
    expected_first = torch.nn.functional.linear(torch.round(x / q) * q, model[0].weight)
    assert torch.allclose(model[0](x), expected_first, atol=1e-6)
    assert not torch.allclose(model[0](x), ref_first, atol=1e-6)
    h = model[0](x)
    assert torch.equal(model[1](h), torch.nn.functional.linear(h, model[1].weight))  # ignored: untouched


def test_summarize_reports_mean_sample_std_and_percent_retained():
    out = summarize([0.8, 0.9, 1.0], fp_accuracy=1.0)
    assert out["mean"] == pytest.approx(0.9) and out["std"] == pytest.approx(0.1)
    assert out["retained_pct"] == pytest.approx(90.0) and out["runs"] == 3
    assert summarize([0.5], 0.5)["std"] == 0.0


def test_plan_runs_rtn_once_smoothquant_only_for_a8_and_ablations_on_their_scheme():
    class Args:
        schemes, methods, seeds = ["W4A16", "W8A8"], list(METHOD_VARIANTS), [0, 1, 2]
        peer, peer_schemes, ablation_scheme, ablations = False, [], "W4A16", "components"

    runs = plan(Args)
    labels = [(v.label, scheme, seed) for v, scheme, seed in runs]
    assert [x for x in labels if x[0] == "rtn"] == [("rtn", "W4A16", 0), ("rtn", "W8A8", 0)]
    assert {x[1] for x in labels if x[0] == "smoothquant"} == {"W8A8"}
    assert [x[2] for x in labels if x[0] == "smoothquant"] == [0, 1, 2]  # it fits its smoothing on data: every seed
    assert len([x for x in labels if x[0].startswith("tlq:")]) == 3 * len(ABLATIONS)
    assert len(labels) == len(set(labels))
    Args.ablations = "shaping"
    shaping = [(v.label, scheme) for v, scheme, _ in plan(Args) if v.label.startswith("tlq:")]
    assert shaping == [(v.label, "W4A16") for v in SHAPING for _ in range(3)]


def test_a_redone_run_keeps_its_success_whichever_file_comes_first():
    ok = {"variant": "tlq", "scheme": "W2A16", "seed": 1, "accuracy": 0.5}
    failed = {"variant": "tlq", "scheme": "W2A16", "seed": 1, "error": "killed"}
    other = {"variant": "tlq", "scheme": "W2A16", "seed": 2, "error": "still failing"}
    for records in ([ok, failed, other], [failed, ok, other]):
        assert latest_records(records) == {("tlq", "W2A16", 1): ok, ("tlq", "W2A16", 2): other}


def test_differences_pair_methods_and_each_ablation_with_the_default_tlq_row():
    """Methods pair with each other; an ablation pairs only with tlq of its scheme; each difference is
    b's seed-averaged accuracy minus a's on the same questions (4 questions on 2 images here)."""
    def run(variant, correct, seed=0):
        return {"variant": variant, "scheme": "W2A16", "seed": seed, "correct": correct}

    results = {"eval": {"clusters": ["a.png", "a.png", "b.png", "b.png"]},
               "runs": [run("rtn", "0001"), run("gptq", "1101"), run("tlq", "1100"), run("tlq", "1110", 1),
                        run("tlq: per-sample weights", "1111"), {"variant": "mbq", "scheme": "W2A16", "error": "x"}]}
    rows = {(d["a"], d["b"]): d for d in differences(results)}
    assert set(rows) == {("rtn", "gptq"), ("rtn", "tlq"), ("gptq", "tlq"), ("tlq", "tlq: per-sample weights")}
    assert rows[("gptq", "tlq")]["diff"] == pytest.approx((2.5 - 3) / 4)  # tlq: 1, 1, 0.5, 0 a question
    assert rows[("tlq", "tlq: per-sample weights")]["diff"] == pytest.approx((4 - 2.5) / 4)


@pytest.mark.slow
def test_quick_accuracy_benchmark_runs_end_to_end_and_writes_well_formed_results(tmp_path):
    from benchmarks.accuracy import main

    assert main(["--quick", "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]) == 0
    results = json.loads((tmp_path / "results" / "accuracy.json").read_text())
    assert results["eval"]["questions"] == 64 and 0 <= results["fp"]["accuracy"] <= 1
    rows = {(r["variant"], r["scheme"]) for r in results["summary"]}
    assert rows == {("rtn", "W4A16"), ("tlq", "W4A16")}
    for r in results["summary"]:
        assert 0 <= r["mean"] <= 1 and r["mean_kl"] >= 0 and 0 <= r["top1_agreement"] <= 1
    assert results["importance"]["per_layer_raw"]
    md = (tmp_path / "results" / "ACCURACY.md").read_text()
    assert "| tlq |" in md and "accuracy_retained.png" in md
    assert (tmp_path / "results" / "accuracy_retained.png").stat().st_size > 0
    # --resume: the tlq record is dropped as if its worker had been killed; only that run is redone,
    # rtn's record is kept as it was, and tlq's comes back the same
    records = tmp_path / "work" / "records-0.jsonl"
    rtn, tlq = (json.loads(line) for line in records.read_text().splitlines())
    records.write_text(json.dumps(rtn) + "\n")
    again = ["--quick", "--resume", "--results-dir", str(tmp_path / "again"), "--work-dir", str(tmp_path / "work")]
    assert main(again) == 0
    resumed = json.loads((tmp_path / "again" / "accuracy.json").read_text())
    assert json.loads((tmp_path / "work" / "todo.json").read_text()) == [["tlq", "W4A16", 0]]
    assert [r["calibration_seconds"] for r in resumed["runs"]][0] == rtn["calibration_seconds"]
    assert [r["accuracy"] for r in resumed["runs"]] == [r["accuracy"] for r in results["runs"]]
    # the work dir of another matrix (here: other data) is refused, not mixed in
    assert main([*again, "--data", "scenes"]) == 2


@pytest.mark.slow
def test_quick_scene_benchmark_reports_types_captions_and_paired_intervals(tmp_path):
    """The testbed's protocol end to end on CI's reduced matrix: per-type accuracy, caption NLL and
    KL against FP, a paired interval against FP for every row and one for the rtn/tlq pair."""
    from benchmarks.accuracy import main
    from tlq_vllm import scenes

    args = ["--data", "scenes", "--quick", "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    assert main(args) == 0
    results = json.loads((tmp_path / "r" / "accuracy.json").read_text())
    assert results["model"].endswith("toyvlm-scenes") and results["calibration_data"] == "scenes:calibration"
    assert results["eval"]["questions"] == 64 and len(results["eval"]["clusters"]) == 64
    assert set(results["eval"]["types"]) <= set(scenes.QA_TYPES) and len(results["fp"]["correct"]) == 64
    assert results["fp"]["caption_tokens"] > 8 * 10 and results["fp"]["caption_nll"] > 0
    for r in results["summary"]:
        assert r["vs_fp"]["low"] <= r["vs_fp"]["diff"] <= r["vs_fp"]["high"]
        assert abs(r["vs_fp"]["diff"] - (r["mean"] - results["fp"]["accuracy"])) < 1e-9
        assert r["caption_mean_kl"] >= 0 and {f"accuracy_{t}" for t in results["eval"]["types"]} <= set(r)
    (pair,) = results["differences"]
    assert (pair["a"], pair["b"]) == ("rtn", "tlq")
    md = (tmp_path / "r" / "ACCURACY.md").read_text()
    assert "## Method differences" in md and "caption NLL" in md


@pytest.mark.slow
def test_endpoint_backend_answers_like_the_transformers_backend(tmp_path):
    """The toy VLM at W4A16 served by `tlq_vllm.serve` (vLLM, tlq plugin) and read by transformers
    give the same greedy answers on nearly every question (bf16 serving vs float32 emulation may
    flip a near-tie), and the CLI's --endpoint path reports accuracy."""
    from transformers import AutoProcessor

    from tlq_vllm.calibrate import CalibrationConfig, run
    from tlq_vllm.eval import endpoint, hf
    from tlq_vllm.eval.__main__ import evaluate_hf
    from tlq_vllm.eval.__main__ import main as eval_main
    from tlq_vllm.serve.process import ServerProcess

    ckpt = run(CalibrationConfig(scheme="W4A16", method="rtn", output=str(tmp_path / "ckpt"), progress=False))
    items = load_items("easy-vqa", limit=48, seed=3)
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    _, expected, _ = evaluate_hf(ckpt, hf.encode(processor, items, progress=False), progress=False)
    vllm_args = ["--enforce-eager", "--max-model-len", "1024"]
    with ServerProcess(ckpt, log=tmp_path / "server.log", vllm_args=vllm_args) as url:
        served = endpoint.predict(f"{url}/v1", items, concurrency=4, progress=False)
        assert eval_main(["--endpoint", f"{url}/v1", "--limit", "16", "--no-progress",
                          "--output", str(tmp_path / "e.json")]) == 0
    agree = sum(a == b for a, b in zip(served, expected, strict=True)) / len(items)
    assert agree >= 0.9, list(zip(served, expected, strict=True))
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metrics"]["questions"] == 16 and len(result["predictions"]) == 16


def test_encoded_batches_keep_one_copy_of_each_image_and_rebuild_the_processor_inputs():
    """Scene questions share images: encode keeps each image's patch rows once, and a batch's
    `inputs` equals what the processor gives for the batch (pixel values bit for bit)."""
    from transformers import AutoProcessor

    from tlq_vllm.eval import hf
    from tlq_vllm.paths import TESTBED_DIR

    items = load_items("scenes")[:21]  # 3 scenes, 7 questions each
    processor = AutoProcessor.from_pretrained(TESTBED_DIR)
    processor.tokenizer.padding_side = "left"
    encoded = hf.encode(processor, items, batch_size=8, progress=False)
    patches = [p for b in encoded for p in b.patches]
    assert len({p.data_ptr() for p in patches}) == 3 and len(patches) == 21
    batch = encoded[1]
    texts = [p + it.answers[0] + processor.tokenizer.eos_token
             for p, it in zip(hf._prompts(processor, batch.items), batch.items, strict=True)]
    direct = processor(text=texts, images=hf._images(batch.items), padding=True, return_tensors="pt")
    assert batch.inputs.keys() == dict(direct).keys()
    assert all(torch.equal(batch.inputs[k], direct[k]) for k in direct)
