"""Calibration data: records (images + question + optional answer) -> model inputs with token roles.

A record is a dict with `image` (a path) or `images` (paths), a `question` or `prompt`, and an
optional `answer`. LLaVA/ShareGPT records (`conversations` with `from`/`value` turns and an
`image`) are accepted too. Sources: a JSONL file, a directory holding `*.jsonl`, or the built-in
`easy-vqa` train split. Image paths in a JSONL resolve relative to the JSONL file and must stay
inside its directory tree.

Each sample is processed by the model's own processor and chat template, one sample per batch
(no padding anywhere), and carries a role per token: vision placeholder, prompt text, answer.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROLE_PROMPT, ROLE_VISION, ROLE_ANSWER = 0, 1, 2


class DataError(ValueError):
    """Bad calibration data: the message names the record and what is wrong."""


@dataclass
class Record:
    images: list[Path]
    prompt: str
    answer: str | None
    source: str  # "file.jsonl:12" or "easy-vqa:123", for error messages


@dataclass
class Sample:
    """One processed calibration sample (batch of 1, on CPU)."""

    inputs: dict[str, torch.Tensor]  # what the HF model's forward takes
    roles: torch.Tensor  # [T] int8: ROLE_PROMPT / ROLE_VISION / ROLE_ANSWER
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.roles.numel())


def load_records(data: str, *, num_samples: int, seed: int) -> list[Record]:
    """Reads `data` ("easy-vqa", a .jsonl file, or a directory of .jsonl files) and returns
    `num_samples` records chosen with `seed` (all records in a fixed shuffled order)."""
    if data == "easy-vqa":
        records = easy_vqa_records()
    else:
        path = Path(data)
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise DataError(f"calibration data directory {path} holds no *.jsonl file")
            records = [r for f in files for r in jsonl_records(f)]
        elif path.is_file():
            records = jsonl_records(path)
        elif "/" in data and not data.startswith((".", "/")):
            raise DataError(
                f"calibration data {data!r} is not a local file or directory; Hugging Face datasets "
                "need network access, which this run does not have: download it and pass a JSONL"
            )
        else:
            raise DataError(f"calibration data {data!r} not found (expected easy-vqa, a .jsonl or a directory)")
    if not records:
        raise DataError(f"calibration data {data!r} is empty")
    if num_samples > len(records):
        raise DataError(
            f"--num-samples {num_samples} asked, but {data!r} has only {len(records)} records"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:num_samples]]


def easy_vqa_records() -> list[Record]:
    """easy-vqa's train split (38,575 questions on 4,000 images); the evaluation uses test."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    image_paths = easy_vqa.get_train_image_paths()
    return [
        Record([Path(image_paths[i])], q, a, f"easy-vqa:{n}")
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def jsonl_values(path: Path) -> Iterator[tuple[str, object]]:
    """(where, value) for each non-blank line of a JSONL file, where = "path:line" for error messages."""
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        yield where, value


def jsonl_records(path: Path) -> list[Record]:
    root = path.parent.resolve()
    return [parse_record(raw, root, where) for where, raw in jsonl_values(path)]


def parse_record(raw: dict, root: Path, where: str) -> Record:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object")
    images = raw.get("images") or ([raw["image"]] if raw.get("image") else [])
    if isinstance(images, str):
        images = [images]
    answer = raw.get("answer")
    if "conversations" in raw:  # LLaVA / ShareGPT: first human turn, first model turn
        turns = raw["conversations"]
        human = next((t["value"] for t in turns if t.get("from") in ("human", "user")), None)
        model = next((t["value"] for t in turns if t.get("from") in ("gpt", "assistant")), None)
        prompt = (human or "").replace("<image>", "").strip()
        answer = answer if answer is not None else model
    else:
        prompt = raw.get("question") or raw.get("prompt")
    if not prompt:
        raise DataError(f"{where}: no question/prompt (or conversations) in the record")
    if isinstance(answer, list):  # VQA-style answer lists: the first is the label
        answer = answer[0] if answer else None
    return Record([resolve_image(p, root, where) for p in images], prompt, answer, where)


def resolve_image(name: str, root: Path, where: str) -> Path:
    """Resolves an image path relative to the JSONL's directory, refusing escapes from it."""
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image path {name!r} points outside {root}")
    if not path.is_file():
        raise DataError(f"{where}: image {name!r} not found ({path})")
    return path


def open_image(path: Path, where: str, max_pixels: int | None):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{where}: cannot read image {path}: {err}") from None
    image = image.convert("RGB")
    if max_pixels and image.width * image.height > max_pixels:
        ratio = (max_pixels / (image.width * image.height)) ** 0.5
        image = image.resize((max(1, int(image.width * ratio)), max(1, int(image.height * ratio))))
    return image


def build_sample(record: Record, processor, image_token_id: int, *, max_pixels: int | None) -> Sample:
    """Processes one record with the model's chat template; the answer tokens (and the end of
    turn) are the last tokens, so roles are assigned by position after tokenizing the answer."""
    images = [open_image(p, record.source, max_pixels) for p in record.images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": record.prompt}]
    prompt_text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    tokenizer = processor.tokenizer
    answer_text = (record.answer or "") + tokenizer.eos_token
    inputs = processor(text=[prompt_text + answer_text], images=images or None, return_tensors="pt")
    input_ids = inputs["input_ids"][0]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if input_ids[-len(answer_ids) :].tolist() != answer_ids:
        raise DataError(f"{record.source}: answer tokens do not line up with the chat template's output")
    roles = torch.full_like(input_ids, ROLE_PROMPT, dtype=torch.int8)
    roles[input_ids == image_token_id] = ROLE_VISION
    roles[-len(answer_ids) :] = ROLE_ANSWER
    inputs.pop("token_type_ids", None)
    return Sample(dict(inputs), roles, record.source)


def dataset_hash(records: list[Record]) -> str:
    """A hash of the calibration set's content (prompts, answers, image bytes), for provenance."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.prompt, r.answer]).encode())
        for p in r.images:
            digest.update(hashlib.sha256(p.read_bytes()).digest())
    return digest.hexdigest()[:16]
