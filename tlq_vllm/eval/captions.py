"""Caption quality on the procedural scenes: teacher-forced NLL per token (and KL against the FP
model, via `hf.agreement_and_kl`), and what greedy captions get right.

Accuracy on short answers moves in whole questions; a caption's 16-40 tokens give a smoother
signal of what quantization changes, and the NLL of held-out captions is the perplexity-style
metric real VLM papers report beside VQA accuracy. Captions of the scene generator list every
object as "a <size> <colour> <shape> at <position>", joined by ", " and a final " and ", so a
generated caption is scored object by object against the reference (precision, recall, F1).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from tlq_vllm.eval.vqa import VQAItem
from tlq_vllm.records import DataError

_SEPARATORS = re.compile(r", | and (?=an? )")


def caption_items(split: str, scenes_count: int) -> list[VQAItem]:
    """The caption item of each of the split's first `scenes_count` scenes (test or validation)."""
    from tlq_vllm import scenes

    if split not in ("test", "validation"):
        raise DataError(f"captions of scenes:{split}: use the test or the validation split")
    items = []
    for index in range(scenes_count):
        qa = scenes.generate(split, index).items[-1]
        items.append(VQAItem(f"scenes-{split}:{index}:caption", scenes.image_file(split, index), qa.question,
                             (qa.answer,), qa.type))
    return items


def object_phrases(caption: str) -> Counter:
    """The caption's object descriptions, e.g. {"a small red circle at top left": 1}."""
    text = caption.strip().rstrip(".").strip()
    return Counter(p.strip() for p in _SEPARATORS.split(text) if p.strip()) if text else Counter()


def caption_scores(items: list[VQAItem], predictions: list[str]) -> dict[str, float]:
    """Exact caption match, and object-level precision, recall and F1 summed over all captions."""
    exact = sum(p.strip() == it.answers[0] for p, it in zip(predictions, items, strict=True))
    hit = generated = wanted = 0
    for p, it in zip(predictions, items, strict=True):
        got, ref = object_phrases(p), object_phrases(it.answers[0])
        hit += sum((got & ref).values())
        generated += sum(got.values())
        wanted += sum(ref.values())
    precision = hit / generated if generated else 0.0
    recall = hit / wanted if wanted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"caption_exact": exact / len(items), "object_precision": precision, "object_recall": recall,
            "object_f1": f1, "captions": len(items)}


def caption_nll(log_probs: list[torch.Tensor], answer_ids: list[list[int]]) -> dict[str, float]:
    """Mean teacher-forced negative log-likelihood per caption token (end of turn included) and
    its perplexity, from `hf.evaluate`'s answer log-probs and the reference token ids."""
    total = sum(-float(lp[torch.arange(len(ids)), torch.tensor(ids)].sum()) for lp, ids in
                zip(log_probs, answer_ids, strict=True))
    tokens = sum(len(ids) for ids in answer_ids)
    return {"caption_nll": total / tokens, "caption_perplexity": math.exp(total / tokens), "caption_tokens": tokens}
