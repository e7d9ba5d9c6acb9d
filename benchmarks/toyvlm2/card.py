"""Writes toy VLM v2's model card: FP accuracy per question type beside chance and majority,
caption quality, the share of vision tokens, and the quantization headroom that RTN measures.

    python -m benchmarks.toyvlm2.card [--model tlq_vllm/assets/toyvlm-scenes]

Evaluates the 3,500 test questions (`tlq_vllm.eval`, transformers, greedy, exact match) and the
captions of the first 500 test scenes (greedy captions scored object by object; teacher-forced NLL
per token), FP first, then RTN checkpoints at --schemes (RTN uses no calibration data, so it is
one deterministic run a scheme: the headroom any method has to win back). Differences from FP
come with paired 95% bootstrap intervals over scenes. Writes `README.md` (the card) and
`card.json` into the model directory beside `training_log.json` and `loss.png`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks import common
from tlq_vllm.paths import TESTBED_DIR

CAPTION_SCENES = 500


def scene_of(item_id: str) -> str:
    """'scenes-test:17:count' -> 'scenes-test:17': the cluster a question's bootstrap resamples."""
    return item_id.rsplit(":", 1)[0]


def baselines(items) -> dict[str, dict[str, float]]:
    """Per question type: chance (a uniform guess over the type's test answers) and majority (its
    most frequent test answer, given to every question)."""
    out = {}
    for t in dict.fromkeys(it.type for it in items):
        answers = Counter(it.answers[0] for it in items if it.type == t)
        out[t] = {"chance": 1 / len(answers), "majority": answers.most_common(1)[0][1] / sum(answers.values()),
                  "answers": len(answers)}
    return out


def evaluate(model_dir, questions, captions, reference=None) -> dict:
    """Question accuracy (per type, with per-question scores) and caption metrics of one checkpoint."""
    from tlq_vllm.eval.__main__ import evaluate_hf
    from tlq_vllm.eval.captions import caption_nll, caption_scores
    from tlq_vllm.eval.vqa import vqa_score

    metrics, predictions, _ = evaluate_hf(model_dir, questions, progress=False)
    items = [it for b in questions for it in b.items]
    scores = [vqa_score(p, it.answers) for p, it in zip(predictions, items, strict=True)]
    cap_metrics, cap_predictions, cap_log_probs = evaluate_hf(
        model_dir, captions, reference=reference, max_new_tokens=64, progress=False)
    cap_items = [it for b in captions for it in b.items]
    cap_metrics.pop("accuracy"), cap_metrics.pop("questions")
    cap = {**cap_metrics, **caption_scores(cap_items, cap_predictions),
           **caption_nll(cap_log_probs, [ids for b in captions for ids in b.answer_ids])}
    return {"questions": metrics, "scores": scores, "captions": cap, "caption_log_probs": cap_log_probs,
            "caption_examples": [{"reference": it.answers[0], "generated": p}
                                 for it, p in list(zip(cap_items, cap_predictions, strict=True))[:3]]}


def rtn_checkpoint(model: Path, scheme: str, out: Path) -> Path:
    from tlq_vllm.calibrate import CalibrationConfig, run

    config = CalibrationConfig(model=str(model), scheme=scheme, method="rtn", data="scenes:calibration",
                               output=str(out), overwrite=True, progress=False)
    return run(config.validate())


def headroom_row(scheme: str, fp: dict, quant: dict, items) -> dict:
    """Accuracy of a quantized checkpoint against FP: overall and per type, each difference with
    its paired bootstrap interval over scenes."""
    clusters = [scene_of(it.id) for it in items]
    row = {"scheme": scheme, "accuracy": quant["questions"]["accuracy"],
           "difference": common.paired_difference_ci(fp["scores"], quant["scores"], clusters), "by_type": {}}
    for t in dict.fromkeys(it.type for it in items):
        idx = [i for i, it in enumerate(items) if it.type == t]
        row["by_type"][t] = common.paired_difference_ci([fp["scores"][i] for i in idx],
                                                        [quant["scores"][i] for i in idx], [clusters[i] for i in idx])
    row["captions"] = quant["captions"]
    return row


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def points(ci: dict) -> str:
    return f"{100 * ci['diff']:+.1f} [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}]"


def card_text(log: dict, card: dict) -> str:
    fp, base, types = card["fp"], card["baselines"], list(card["baselines"])
    train = [r for r in log["history"] if "loss" in r]
    held = [r for r in log["history"] if "validation" in r]
    weak = [t for t in types if fp["questions"][f"accuracy_{t}"] < base[t]["majority"] + 0.05]
    type_rows = [(t, int(card["questions_per_type"][t]), pct(fp["questions"][f"accuracy_{t}"]),
                  pct(base[t]["chance"]), pct(base[t]["majority"])) for t in types]
    cap = fp["captions"]
    head = [(r["scheme"], pct(r["accuracy"]), points(r["difference"]),
             *(f"{100 * r['by_type'][t]['diff']:+.1f}" for t in types), f"{r['captions']['caption_nll']:.3f}",
             f"{r['captions']['mean_kl']:.2e}", pct(r["captions"]["object_f1"])) for r in card["rtn"]]
    rows = {r["scheme"]: r for r in card["rtn"]}

    def loss(label: str, d: dict) -> str:
        return (f"RTN {label} loses {-100 * d['diff']:.1f} points (95% interval {-100 * d['high']:.1f} to "
                f"{-100 * d['low']:.1f})")

    verdict = []
    for name, goal in (("W3A16", 0.05), ("W4A8", 0.02)):
        if name in rows:
            d = rows[name]["difference"]
            verdict.append(f"{loss(name, d)}; issue 14 asks for at least {100 * goal:.0f}: "
                           + ("met." if -d["high"] >= goal else
                              "met in the mean, not at the interval's edge." if -d["diff"] >= goal else "**not met**."))
    if "W2A16" in rows:
        verdict.append(loss("W2A16 (group 64, the stress setting)", rows["W2A16"]["difference"]) + ".")
    finished = ("the schedule ran to its end" if log.get("schedule_finished", True)
                else "**the schedule was cut short**")
    earlier = log.get("earlier_runs") or []
    if earlier:
        finished += (f"; it continued {len(earlier)} earlier run(s) of "
                     f"{sum(r.get('examples_seen') or 0 for r in earlier):,} examples in all (`--init-from`: "
                     "`earlier_runs` in `training_log.json`), so the model has seen "
                     f"{log['examples_seen'] + sum(r.get('examples_seen') or 0 for r in earlier):,}")
    machine = f"{card['machine']} {common.describe_isa(card.get('isa_flags'))}"
    examples = "\n".join(f"- reference: {e['reference']}\n  generated: {e['generated']}"
                         for e in fp["caption_examples"])
    return f"""---
license: mit
pipeline_tag: image-text-to-text
tags: [qwen2_vl, procedural-scenes, toy, tlq-vllm]
---

# toyvlm-scenes (toy VLM v2)

A {log['parameters'] / 1e6:.2f} M-parameter Qwen2-VL trained from scratch by `python -m benchmarks.toyvlm2.train`
(tlq-vllm) on the procedural scenes of `tlq_vllm.scenes` (docs/testbed.md): the testbed on which quantization
methods are to be told apart. A 4-layer Qwen2 decoder (hidden 256, MLP 768, 4 heads, 2 KV heads: the part
that is quantized), a 4-block ViT 128 wide with the 2x2 patch merger, a byte-level BPE of the scene text,
the Qwen2-VL chat template and image processor. vLLM serves it (`tests/test_toyvlm2.py`).

## Data

Scenes of 2-5 objects (5 shapes, 8 colours, 2 sizes on a 3x3 grid) rendered at 280x280: **100 vision tokens
per image**, {pct(card['vision_share'])}% of the tokens of a test question's sequence (prompt, image and
answer). Seven question types and a caption per scene; train, calibration, validation and test scenes are
disjoint by construction (their layouts hash into separate ranges). Every training example is a fresh train scene.

## Training

{log['step']} steps of batch {log['batch_size']} ({log['examples_seen']:,} examples), AdamW (lr {log['lr']},
warmup {log['warmup']}, cosine to 10%, weight decay {log['weight_decay']}), loss on the answer tokens, float32
(TF32), seed {log['seed']}; saved in bf16; {finished}. {log['wall_s'] / 60:.1f} minutes on {log.get('gpu') or
log['machine']} (torch {log['torch']}). Training loss {train[0]['loss']:.2f} at step {train[0]['step']},
{train[-1]['loss']:.3f} at the end; validation loss {held[0]['validation']['loss']:.3f} at step {held[0]['step']},
{held[-1]['validation']['loss']:.3f} at the end (every value: `training_log.json`). The validation loss was
still falling when the schedule ended ({held[-5]['validation']['loss']:.3f} at step {held[-5]['step']}): the
model is limited by its training compute (one device command, about 12 minutes), not yet by its capacity.

![loss curve](loss.png)

## FP accuracy (test split: {card['questions']:,} questions on {card['questions'] // len(types)} scenes)

Exact match after normalisation, greedy decoding, `python -m tlq_vllm.eval --model <this dir> --data scenes`:
**{pct(fp['questions']['accuracy'])}%** (evaluated {card['date']} on {machine}).

{common.markdown_table(["type", "questions", "accuracy %", "chance %", "majority %"], type_rows)}

Chance: a uniform guess over the type's test answers; majority: the type's most frequent test answer for every
question. {("At or near the majority baseline: " + ", ".join(weak) + ". The model has not learned these types, "
"so quantization cannot lose anything there.") if weak else "Every type is above its majority baseline."}

## Captions (first {cap['captions']} test scenes)

Greedy captions: {pct(cap['caption_exact'])}% exactly right; objects (each "a <size> <colour> <shape> at
<position>") precision {pct(cap['object_precision'])}%, recall {pct(cap['object_recall'])}%, F1
{pct(cap['object_f1'])}%. Teacher-forced NLL {cap['caption_nll']:.3f} per token (perplexity
{cap['caption_perplexity']:.2f}) over {cap['caption_tokens']:,} caption tokens. Examples:

{examples}

## Quantization headroom: RTN (no calibration data)

Accuracy on the same {card['questions']:,} test questions; difference from FP in points with its paired 95%
bootstrap interval over scenes; per type the difference alone; caption NLL per token, KL(FP || RTN) on the
caption tokens and object F1 of greedy captions. `python -m benchmarks.toyvlm2.card`, {card['date']}, on
{machine}; RTN is deterministic: one run a scheme.

{common.markdown_table(["scheme", "accuracy %", "vs FP, points [95%]", *types, "caption NLL", "caption KL",
                        "object F1 %"], [("FP", pct(fp['questions']['accuracy']), "", *("" for _ in types),
                        f"{cap['caption_nll']:.3f}", "", pct(cap['object_f1'])), *head])}

{chr(10).join("- " + v for v in verdict)}

## Limitations

A toy: it describes and answers questions about synthetic scenes of coloured shapes and nothing else.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.toyvlm2.card", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TESTBED_DIR))
    parser.add_argument("--schemes", default="W4A16,W3A16,W2A16,W4A8,W8A8",
                        help="RTN checkpoints to measure ('' = none)")
    parser.add_argument("--limit", type=int, help="test questions (default all 3,500)")
    parser.add_argument("--caption-scenes", type=int, default=CAPTION_SCENES)
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not (model / "training_log.json").is_file():
        print(f"error: --model {model}: no training_log.json (a toy VLM v2 directory is expected)", file=sys.stderr)
        return 2
    from transformers import AutoProcessor

    from tlq_vllm.eval import hf
    from tlq_vllm.eval.captions import caption_items
    from tlq_vllm.eval.vqa import load_items

    started = time.time()
    log = common.read_json(model / "training_log.json")
    items = load_items("scenes", limit=args.limit)
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    questions = hf.encode(processor, items, progress=False)
    captions = hf.encode(processor, caption_items("test", args.caption_scenes), progress=False)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vision = [float((b.inputs["input_ids"] == image_token).sum() / b.inputs["attention_mask"].sum())
              for b in questions]
    fp = evaluate(model, questions, captions)
    print(f"FP: accuracy {fp['questions']['accuracy']:.4f}, caption NLL {fp['captions']['caption_nll']:.3f}",
          flush=True)
    facts = common.cpu_facts()
    card = {"model": model.name, "date": time.strftime("%Y-%m-%d"), "machine": facts["cpu_model"],
            "isa_flags": facts["isa_flags"], "questions": len(items), "vision_share": statistics.fmean(vision),
            "questions_per_type": Counter(it.type for it in items), "baselines": baselines(items),
            "fp": {k: v for k, v in fp.items() if k not in ("scores", "caption_log_probs")}, "rtn": []}
    work = Path(tempfile.mkdtemp(prefix="tlq-testbed-card-"))
    try:
        for scheme in [s.strip().upper() for s in args.schemes.split(",") if s.strip()]:
            checkpoint = rtn_checkpoint(model, scheme, work / f"rtn-{scheme}")
            quant = evaluate(checkpoint, questions, captions, reference=fp["caption_log_probs"])
            card["rtn"].append(headroom_row(scheme, fp, quant, items))
            print(f"RTN {scheme}: accuracy {quant['questions']['accuracy']:.4f} "
                  f"({points(card['rtn'][-1]['difference'])} points), caption NLL "
                  f"{quant['captions']['caption_nll']:.3f}", flush=True)
            shutil.rmtree(checkpoint, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    card["seconds"] = round(time.time() - started, 1)
    common.write_json(model / "card.json", card)
    (model / "README.md").write_text(card_text(log, card))
    print(f"wrote {model / 'README.md'} and card.json ({card['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
