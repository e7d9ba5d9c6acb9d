"""Calibration data: records (images + question + optional answer) -> model inputs with token roles.

A record is a mapping with an image field (`image` or `images`: one or several), a question
(`question`, `prompt` or `query`) and an optional answer (`answer`, `answers` (the first one is
the label) or `caption`); LLaVA/ShareGPT records (`conversations` of `from`/`value` turns) are
records too. `--image-column / --question-column / --answer-column` name other fields. Sources:

- a JSONL file, or a directory of `*.jsonl` files;
- a JSON file holding a list of records (LLaVA's `llava_v1_5_mix665k.json` style);
- a Hugging Face `datasets` dataset on disk: a `save_to_disk` directory, `.parquet` or `.arrow`
  files, or a directory of them (read by `hf_datasets`, which imports `datasets` only then);
- the built-in `easy-vqa` train split;
- the built-in procedural scenes, `scenes:<split>` (`scenes:calibration` is the one meant for
  calibration; the test split is refused: it is the evaluation's).

An image is a path, or for datasets also the encoded bytes of an image cell. Absolute paths are
taken as they are: a user's own file naming the user's own images is the normal case. Relative
paths resolve against `--image-root` when given, else against the data file's directory (for a
dataset, its directory). A record that cannot be used is an error naming the record
(`file.jsonl:12`, `llava.json[3] (id 000000033471)`, `data.parquet[41]`), never skipped.

Each sample is processed by the model's own processor and chat template, one sample per batch
(no padding anywhere), and carries a role per token: vision placeholder, prompt text, answer.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from tlq_vllm.records import DataError, jsonl_values, resolve_image

ROLE_PROMPT, ROLE_VISION, ROLE_ANSWER = 0, 1, 2


IMAGE_FIELDS = ("image", "images")
QUESTION_FIELDS = ("question", "prompt", "query")
ANSWER_FIELDS = ("answer", "answers", "caption")
# A directory with one of these is a `datasets` save_to_disk directory (a Dataset or a DatasetDict).
SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")
DATASET_SUFFIXES = (".parquet", ".arrow")


@dataclass(frozen=True)
class Fields:
    """Which field of a record holds the image(s), the question and the answer; None: the first
    of the common names (IMAGE_FIELDS, QUESTION_FIELDS, ANSWER_FIELDS) that the record has."""

    image: str | None = None
    question: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class InlineImage:
    """An image stored in the data itself (a dataset's image cell): its encoded bytes."""

    data: bytes = field(repr=False)
    name: str | None = None  # the file name the cell recorded, if any

    def __str__(self) -> str:
        return f"bytes ({self.name})" if self.name else "bytes"


@dataclass
class Record:
    images: list[Path | InlineImage]
    prompt: str
    answer: str | None
    source: str  # "file.jsonl:12", "llava.json[3]" or "easy-vqa:123", for error messages


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


def load_records(
    data: str,
    *,
    num_samples: int,
    seed: int,
    image_root: str | None = None,
    fields: Fields = Fields(),
) -> list[Record]:
    """Reads `data` (see the module docstring for what it may be) and returns `num_samples`
    records chosen with `seed`: the first `num_samples` of a `seed`-shuffled order of all records.
    A dataset is only indexed: just the chosen rows are read."""
    if data == "easy-vqa":
        if image_root is not None or fields != Fields():
            raise DataError("--image-root and --*-column apply to your own data, not to the built-in easy-vqa")
        return choose(easy_vqa_records(), num_samples, seed, data)
    if data.startswith("scenes:"):
        if image_root is not None or fields != Fields():
            raise DataError("--image-root and --*-column apply to your own data, not to the built-in scenes")
        return scene_records(data.removeprefix("scenes:"), num_samples, seed)
    path = Path(data)
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"--image-root {image_root} is not a directory")
    if is_dataset(path):
        from tlq_vllm.calibrate.hf_datasets import dataset_records

        return dataset_records(path, num_samples=num_samples, seed=seed, image_root=root, fields=fields)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(
                f"calibration data directory {path} holds no *.jsonl, *.parquet or *.arrow file and is not a "
                "datasets save_to_disk directory"
            )
        records = [r for f in files for r in jsonl_records(f, image_root=root, fields=fields)]
    elif path.is_file() and path.suffix == ".json":
        records = json_list_records(path, image_root=root, fields=fields)
    elif path.is_file():
        records = jsonl_records(path, image_root=root, fields=fields)
    elif "/" in data and not data.startswith((".", "/")):
        raise DataError(
            f"calibration data {data!r} is not a local file or directory; Hugging Face hub datasets "
            "need network access, which this run does not have: download it (save_to_disk or its parquet "
            "files) and pass that path"
        )
    else:
        raise DataError(
            f"calibration data {data!r} not found (expected easy-vqa, scenes:calibration, a .jsonl, .json, "
            ".parquet or .arrow file, or a directory of them)"
        )
    return choose(records, num_samples, seed, data)


def is_dataset(path: Path) -> bool:
    """A `datasets` dataset on disk: a save_to_disk directory, a .parquet/.arrow file, or a
    directory of those files (and no *.jsonl)."""
    if path.is_file():
        return path.suffix in DATASET_SUFFIXES
    if not path.is_dir():
        return False
    if any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
        return True
    return not any(path.glob("*.jsonl")) and any(p.suffix in DATASET_SUFFIXES for p in path.iterdir())


def chosen_indices(total: int, num_samples: int, seed: int, data: str) -> list[int]:
    """The first `num_samples` of a `seed`-shuffled order of `total` records."""
    if total == 0:
        raise DataError(f"calibration data {data!r} is empty")
    if num_samples > total:
        raise DataError(f"--num-samples {num_samples} asked, but {data!r} has only {total} records")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order[:num_samples]


def choose(records: list[Record], num_samples: int, seed: int, data: str) -> list[Record]:
    return [records[i] for i in chosen_indices(len(records), num_samples, seed, data)]


def easy_vqa_records() -> list[Record]:
    """easy-vqa's train split (38,575 questions on 4,000 images); the evaluation uses test."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    image_paths = easy_vqa.get_train_image_paths()
    return [
        Record([Path(image_paths[i])], q, a, f"easy-vqa:{n}")
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def scene_records(split: str, num_samples: int, seed: int) -> list[Record]:
    """`num_samples` question/caption records of the split's first CALIBRATION_POOL scenes (every
    item of a scene is a record, its answer the label); only the chosen scenes are drawn."""
    from tlq_vllm import scenes

    if split not in scenes.SPLITS or split == "test":
        raise DataError(f"scenes:{split}: calibrate on scenes:calibration (or train / validation); "
                        "scenes:test is the evaluation split")
    per_scene = len(scenes.TASK_TYPES)
    chosen = chosen_indices(scenes.CALIBRATION_POOL * per_scene, num_samples, seed, f"scenes:{split}")
    records = []
    for k in chosen:
        index, item = divmod(k, per_scene)
        qa = scenes.generate(split, index).items[item]
        records.append(Record([scenes.image_file(split, index)], qa.question, qa.answer,
                              f"scenes:{split}:{index}:{qa.type}"))
    return records


def jsonl_records(path: Path, *, image_root: Path | None = None, fields: Fields = Fields()) -> list[Record]:
    root = image_root or path.parent
    return [parse_record(raw, root, where, fields) for where, raw in jsonl_values(path)]


def json_list_records(path: Path, *, image_root: Path | None = None, fields: Fields = Fields()) -> list[Record]:
    """A JSON file holding a list of records, as LLaVA's training mixes are published."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        hint = "; one record per line is JSON Lines: name the file .jsonl" if err.msg == "Extra data" else ""
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}){hint}") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(value).__name__}")
    root = image_root or path.parent
    return [parse_record(raw, root, record_name(path, i, raw), fields) for i, raw in enumerate(value)]


def record_name(path: Path, index: int, raw: object) -> str:
    """`data.json[3]`, with the record's own id when it has one: `data.json[3] (id 000000033471)`."""
    own_id = raw.get("id") if isinstance(raw, dict) else None
    return f"{path}[{index}]" + (f" (id {own_id})" if own_id not in (None, "") else "")


def field_name(raw: dict, named: str | None, common: tuple[str, ...], flag: str, where: str) -> str | None:
    """The field holding one part of a record: the one the user named (it must be there), else
    the first common name present, else None."""
    if named is not None:
        if named not in raw:
            raise DataError(f"{where}: no field {named!r} ({flag}); the record has {', '.join(map(str, raw))}")
        return named
    return next((name for name in common if raw.get(name) is not None), None)


def parse_record(raw: object, root: Path, where: str, fields: Fields = Fields()) -> Record:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a mapping of fields, got {type(raw).__name__}")
    image_field = field_name(raw, fields.image, IMAGE_FIELDS, "--image-column", where)
    question_field = field_name(raw, fields.question, QUESTION_FIELDS, "--question-column", where)
    answer_field = field_name(raw, fields.answer, ANSWER_FIELDS, "--answer-column", where)
    answer = raw[answer_field] if answer_field else None
    if question_field is None and "conversations" in raw:  # LLaVA / ShareGPT: first human turn, first model turn
        prompt, model_turn = conversation_turns(raw["conversations"], where)
        answer = answer if answer is not None else model_turn
    else:
        prompt = raw[question_field] if question_field else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: no question ({'/'.join(QUESTION_FIELDS)} or conversations) in the record")
    images = image_sources(raw[image_field] if image_field else None, root, where)
    return Record(images, prompt, label(answer, where), where)


def conversation_turns(turns: object, where: str) -> tuple[str | None, str | None]:
    """LLaVA/ShareGPT `conversations`: the first human turn (without `<image>`) and the first model turn."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: conversations must be a list of {{from, value}} turns")
    human = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
    model = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
    return (human.replace("<image>", "").strip() if isinstance(human, str) else None), model


def label(answer: object, where: str) -> str | None:
    """The answer used as the label: VQA-style answer lists give their first answer, VQA v2's
    `{"answer": ...}` entries their text."""
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if isinstance(answer, dict):
        answer = answer.get("answer", answer.get("text"))
    if answer is None or isinstance(answer, str):
        return answer
    if isinstance(answer, (int, float)):
        return str(answer)
    raise DataError(f"{where}: the answer must be text, got {type(answer).__name__}")


def image_sources(cell: object, root: Path, where: str) -> list[Path | InlineImage]:
    """A record's image field -> image sources: a path (str), a list of them, or a dataset's
    image cell (`{"bytes": ..., "path": ...}`, or raw bytes); None or [] is a text-only record."""
    if cell is None or cell == "":
        return []
    if isinstance(cell, (list, tuple)):
        return [source for item in cell for source in image_sources(item, root, where)]
    if isinstance(cell, str):
        return [resolve_image(cell, root, where)]
    if isinstance(cell, (bytes, bytearray)):
        return [InlineImage(bytes(cell))]
    if isinstance(cell, dict) and ("bytes" in cell or "path" in cell):
        if cell.get("bytes"):
            return [InlineImage(bytes(cell["bytes"]), cell.get("path"))]
        if cell.get("path"):
            return [resolve_image(cell["path"], root, where)]
    raise DataError(f"{where}: cannot use {type(cell).__name__} {str(cell)[:60]!r} as an image (a path or image bytes)")


def open_image(source: Path | InlineImage, where: str, max_pixels: int | None):
    try:
        image = Image.open(io.BytesIO(source.data) if isinstance(source, InlineImage) else source)
        image.load()
    except UnidentifiedImageError:
        raise DataError(f"{where}: cannot read image {source}: not an image format Pillow can decode") from None
    except OSError as err:
        raise DataError(f"{where}: cannot read image {source}: {err}") from None
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
        for image in r.images:
            digest.update(hashlib.sha256(image.data if isinstance(image, InlineImage) else image.read_bytes()).digest())
    return digest.hexdigest()[:16]
