"""Writes the toy VLM's model card: FP accuracy on the whole easy-vqa test split, training facts.

    python -m benchmarks.toyvlm.card [--model tlq_vllm/assets/toyvlm-easyvqa]

Evaluates all 9,673 test questions with `tlq_vllm.eval` (transformers, greedy, exact match),
breaks accuracy down by question type, and writes `README.md` and `fp_accuracy.json` into the
model directory next to `training_log.json` and `loss.png` from the training run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from tlq_vllm.models.builtin import TOYVLM_DIR

SHAPES = {"circle", "rectangle", "triangle"}


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def card_text(log: dict, fp: dict, by_type: dict) -> str:
    weak_types = [t for t, v in by_type.items() if v["accuracy"] < v["majority"] + 0.05]
    weak = (f"It has not learned to answer {' or '.join(weak_types)} questions in {log['steps']} steps: its accuracy "
            "there is at the majority baseline, so it reads that information from the image poorly or not at all; "
            "quantization cannot lose what the model does not have." if weak_types else "")
    rows = "\n".join(f"| {t} | {v['questions']} | {100 * v['accuracy']:.2f} | {100 * v['majority']:.2f} |"
                     for t, v in by_type.items())
    return f"""---
license: mit
pipeline_tag: image-text-to-text
tags: [qwen2_vl, easy-vqa, toy, tlq-vllm]
---

# toyvlm-easyvqa

A {log['parameters'] / 1e6:.1f} M-parameter Qwen2-VL (4-block ViT 256 wide with the 2x2 patch merger, a 4-layer
Qwen2 decoder with hidden size 256 and MLP 1024, byte-level BPE tokenizer of 1,024 tokens trained on easy-vqa's
text, Qwen2-VL chat template and image processor) trained from scratch by
`python -m benchmarks.toyvlm.train` (tlq-vllm) so that quantization accuracy can be measured on a model whose
answers mean something, on machines that cannot download a pretrained VLM. It is the calibrator's default model.

## Data

[easy-vqa](https://pypi.org/project/easy-vqa/) (MIT): 64x64 images of one coloured shape with questions about its
shape and colour. Trained on the train split ({log['train_questions']:,} questions on 4,000 images); evaluated on
the test split (9,673 questions on 1,000 other images). Images reach the model at 112x112 (the processor's pixel
floor): 16 image tokens.

## Training

{log['steps']} steps of batch {log['batch_size']} ({log['epochs']} epochs), AdamW (lr {log['lr']}, warmup
{log['warmup']}, cosine to 10%, weight decay {log['weight_decay']}), loss on the answer tokens only, float32, seed
{log['seed']}; saved in bf16. {log['wall_s'] / 60:.0f} minutes on {log['machine']} (torch {log['torch']}).
Final training loss {log['history'][-1]['loss']:.4f}.

![loss curve](loss.png)

## FP accuracy (easy-vqa test split, all questions)

Exact match after normalisation, greedy decoding, `python -m tlq_vllm.eval --model <this dir>`:
**{100 * fp['accuracy']:.2f}%** of {fp['questions']:,} questions (evaluated {fp['date']}).

| question type | questions | accuracy % | majority-answer baseline % |
|---|---|---|---|
{rows}

The majority baseline answers every question of a type with that type's most frequent test answer: the
margin above it is what the model reads from the image.

## Limitations

A toy: it answers easy-vqa's three question types about synthetic images and nothing else.
{weak}
"""


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoProcessor

    from tlq_vllm.eval import hf, load_items, vqa_score
    from tlq_vllm.eval.__main__ import evaluate_hf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TOYVLM_DIR))
    parser.add_argument("--reuse", action="store_true", help="rewrite the card from fp_accuracy.json, no evaluation")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    log = json.loads((model_dir / "training_log.json").read_text())
    if args.reuse:
        fp = json.loads((model_dir / "fp_accuracy.json").read_text())
        (model_dir / "README.md").write_text(card_text(log, fp, fp["by_type"]))
        return 0
    items = load_items("easy-vqa")
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    metrics, predictions, _ = evaluate_hf(model_dir, hf.encode(processor, items))
    by_type: dict[str, dict] = {}
    for t in ("shape", "color", "yes/no"):
        idx = [i for i, it in enumerate(items) if question_type(it.answers[0]) == t]
        majority = Counter(items[i].answers[0] for i in idx).most_common(1)[0][1] / len(idx)
        accuracy = sum(vqa_score(predictions[i], items[i].answers) for i in idx) / len(idx)
        by_type[t] = {"questions": len(idx), "accuracy": accuracy, "majority": majority}
    fp = {**metrics, "date": time.strftime("%Y-%m-%d"), "by_type": by_type}
    (model_dir / "fp_accuracy.json").write_text(json.dumps(fp, indent=1) + "\n")
    (model_dir / "README.md").write_text(card_text(log, fp, by_type))
    print(f"FP accuracy {100 * fp['accuracy']:.2f}% on {fp['questions']} questions; "
          + ", ".join(f"{t} {100 * v['accuracy']:.1f}%" for t, v in by_type.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
