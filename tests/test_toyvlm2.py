"""The v2 toy VLM trainer on its tiny recipe: stop + --resume equals an uninterrupted run, bit for bit,
and the result is a model directory transformers (and, slow, vLLM) load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.toyvlm2.train import main
from tlq_vllm import scenes

TINY = ["--recipe", "toyvlm-scenes-tiny", "--steps", "4", "--batch-size", "2", "--warmup", "1", "--log-every", "1",
        "--eval-every", "2", "--eval-examples", "8", "--checkpoint-every", "100"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run twice: straight through, and stopped after step 2 then resumed."""
    root = tmp_path_factory.mktemp("toyvlm2")
    assert main([*TINY, "--output", str(root / "straight"), "--checkpoint-dir", str(root / "ck-a")]) == 0
    resumed = [*TINY, "--output", str(root / "resumed"), "--checkpoint-dir", str(root / "ck-b")]
    assert main([*resumed, "--stop-at", "2"]) == 0
    assert not (root / "resumed").exists()  # no model directory until the schedule ends
    assert torch.load(root / "ck-b" / "last.pt", weights_only=False)["step"] == 2
    assert main([*resumed, "--resume"]) == 0
    return root


def test_resume_continues_bit_identically(runs):
    a, b = load_file(runs / "straight" / "model.safetensors"), load_file(runs / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((runs / "straight" / "training_log.json").read_text())
    log_b = json.loads((runs / "resumed" / "training_log.json").read_text())
    strip = [{k: v for k, v in r.items() if k not in ("elapsed_s", "s_per_step")} for r in log_a["history"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("elapsed_s", "s_per_step")} for r in log_b["history"]]
    assert [r["step"] for r in log_a["history"]] == [1, 2, 3, 4]
    assert {f"exact_{t}" for t in scenes.TASK_TYPES} <= set(log_a["history"][-1]["validation"])


def test_resume_refuses_another_runs_checkpoint(runs, capsys):
    with pytest.raises(SystemExit, match="different run .*steps 4 there, 6 here"):
        longer = [("6" if prev == "--steps" else arg) for prev, arg in zip(["", *TINY], TINY, strict=False)]
        main([*longer, "--output", str(runs / "x"), "--checkpoint-dir", str(runs / "ck-b"), "--resume"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main([*TINY, "--output", str(runs / "x"), "--checkpoint-dir", str(runs / "none"), "--resume"])


def test_export_writes_the_checkpoint_as_a_model_directory(runs):
    """--export: the finished run's checkpoint gives the same weights as the run's own output; a
    stopped run's gives a directory whose log says the schedule did not finish."""
    assert main([*TINY, "--output", str(runs / "exported"), "--checkpoint-dir", str(runs / "ck-a"), "--export"]) == 0
    a, b = load_file(runs / "straight" / "model.safetensors"), load_file(runs / "exported" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((runs / "exported" / "training_log.json").read_text())["schedule_finished"] is True
    stopped = [*TINY, "--checkpoint-dir", str(runs / "ck-c")]
    assert main([*stopped, "--output", str(runs / "never"), "--stop-at", "1"]) == 0
    assert main([*stopped, "--output", str(runs / "partial"), "--export"]) == 0
    log = json.loads((runs / "partial" / "training_log.json").read_text())
    assert (log["step"], log["steps"], log["schedule_finished"]) == (1, 4, False)
    with pytest.raises(SystemExit, match="--export: no checkpoint"):
        main([*TINY, "--output", str(runs / "x"), "--checkpoint-dir", str(runs / "none"), "--export"])


def test_init_from_continues_from_a_saved_model(runs):
    """--init-from: a run at learning rate 0 starting from the saved model writes the same weights
    (bf16 -> float32 -> bf16 is exact); its examples start at --first-example; another recipe's
    directory is refused."""
    again = [*TINY, "--lr", "0", "--eval-every", "0", "--checkpoint-dir", str(runs / "ck-d"),
             "--init-from", str(runs / "straight"), "--first-example", "8", "--output", str(runs / "again")]
    assert main(again) == 0
    a, b = load_file(runs / "straight" / "model.safetensors"), load_file(runs / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((runs / "again" / "training_log.json").read_text())
    assert (log["init_from"], log["first_example"]) == (str(runs / "straight"), 8)
    full_recipe = [("toyvlm-scenes" if arg == "toyvlm-scenes-tiny" else arg) for arg in TINY]
    with pytest.raises(SystemExit, match="--init-from .*do not fit"):
        main([*full_recipe, "--output", str(runs / "x"), "--checkpoint-dir", str(runs / "ck-e"),
              "--init-from", str(runs / "straight")])


def test_output_is_a_qwen2_vl_directory_transformers_loads(runs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = runs / "straight"
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    assert model.config.architectures == ["Qwen2VLForConditionalGeneration"]
    sample = scenes.generate("test", 0)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.items[0].question}]}],
        add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[sample.image()], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 100
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert (model_dir / "loss.png").is_file() and (model_dir / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_vllm_serves_the_trained_directory(runs):
    from vllm import SamplingParams

    from tlq_vllm.testing.vllm_engine import vllm_engine

    sample = scenes.generate("test", 0)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": sample.image()},
                                             {"type": "text", "text": sample.items[0].question}]}]
    with vllm_engine(runs / "straight") as llm:
        result = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(result.outputs[0].token_ids) > 0
    image_token = json.loads((runs / "straight" / "config.json").read_text())["image_token_id"]
    assert sum(t == image_token for t in result.prompt_token_ids) == 100
