"""VQA items and scoring: easy-vqa's test split, the procedural scenes (`scenes`: the test split,
`scenes:validation` for choosing knobs) or a generic VQA JSONL; exact match / VQA accuracy.

A generic record is `{"image": "img.png", "question": "...", "answers": ["...", ...]}` (`answer`
for a single one); image paths resolve relative to the JSONL file. Scoring normalises both sides
(lower case, punctuation and articles dropped, number words to digits, as in the VQA evaluation
script) and gives min(#annotators who gave the prediction / 3, 1): the VQA accuracy that
TextVQA and VizWiz report; with one reference answer that is exact match.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from tlq_vllm.records import DataError, jsonl_values, resolve_image


@dataclass(frozen=True)
class VQAItem:
    id: str
    image: Path
    question: str
    answers: tuple[str, ...]
    type: str = ""  # question type, where the data set has them (scenes): accuracy is also reported per type


def load_items(data: str, *, limit: int | None = None, seed: int = 0) -> list[VQAItem]:
    """`easy-vqa` (the test split: 9,673 questions on 1,000 images, never used for calibration) or a
    JSONL file. With `limit`, a fixed subset: the first `limit` items of a `seed`-shuffled order,
    so the same (limit, seed) always selects the same questions."""
    if data == "easy-vqa":
        items = easy_vqa_test_items()
    elif data == "scenes" or data.startswith("scenes:"):
        items = scene_items(data.removeprefix("scenes").removeprefix(":") or "test")
    else:
        path = Path(data)
        if not path.is_file():
            raise DataError(f"evaluation data {data!r} not found (expected easy-vqa, scenes or a .jsonl file)")
        items = jsonl_items(path)
    if not items:
        raise DataError(f"evaluation data {data!r} is empty")
    if limit is not None and limit < len(items):
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        items = [items[i] for i in sorted(order[:limit])]
    return items


def easy_vqa_test_items() -> list[VQAItem]:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [
        VQAItem(f"easy-vqa-test:{n}", Path(paths[i]), q, (a,))
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def scene_items(split: str) -> list[VQAItem]:
    """Every question (not the caption) of the split's first EVAL_SCENES scenes: 7 types a scene."""
    from tlq_vllm import scenes

    if split not in ("test", "validation"):
        raise DataError(f"scenes:{split}: evaluate on scenes (the test split) or scenes:validation")
    items = []
    for index in range(scenes.EVAL_SCENES):
        image = scenes.image_file(split, index)
        items += [VQAItem(f"scenes-{split}:{index}:{qa.type}", image, qa.question, (qa.answer,), qa.type)
                  for qa in scenes.generate(split, index).items if qa.type != "caption"]
    return items


def jsonl_items(path: Path) -> list[VQAItem]:
    root = path.parent.resolve()
    items = []
    for where, raw in jsonl_values(path):
        answers = raw.get("answers", raw.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        if not raw.get("image") or not raw.get("question") or not answers:
            raise DataError(f"{where}: a VQA record needs image, question and answers")
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]  # VQA v2 style dicts too
        items.append(VQAItem(str(raw.get("id", where)), resolve_image(raw["image"], root, where),
                             raw["question"], tuple(answers)))
    return items


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(text: str) -> str:
    """Lower case; punctuation dropped (a period only when it is not a decimal point); number
    words to digits; articles removed; whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", text.lower().replace("\n", " "))
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text).replace("'", "")
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """min(matches / 3, 1) over normalised answers; 1 reference answer: exact match (0 or 1)."""
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return 1.0 if len(answers) == 1 and matches else min(matches / 3, 1.0)
