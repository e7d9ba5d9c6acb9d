"""Hugging Face `datasets` datasets on disk as calibration records (data.py says what a record is).

Reads a `save_to_disk` directory (a Dataset; of a DatasetDict its `train` split, or its only
one), `.parquet` files (through datasets' parquet builder, which converts them to Arrow in its
cache once), `.arrow` files (memory-mapped where they are), or a directory of such files.

Columns are resolved once for the whole dataset, so a missing column is one error naming the
dataset and its columns. Then only the chosen rows are read, in Arrow form: an image cell stays
what `datasets.Image` stores (`{"bytes": ..., "path": ...}`: PIL images given to `from_dict` are
stored so), nothing is decoded before the sample is built, and a decode error names the row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow

from tlq_vllm.calibrate.data import (
    ANSWER_FIELDS,
    DATASET_SUFFIXES,
    IMAGE_FIELDS,
    QUESTION_FIELDS,
    SAVE_TO_DISK_MARKERS,
    DataError,
    Fields,
    Record,
    chosen_indices,
    parse_record,
    record_name,
)


def dataset_records(
    path: Path, *, num_samples: int, seed: int, image_root: Path | None, fields: Fields
) -> list[Record]:
    """`num_samples` records of the dataset at `path`, chosen as data.load_records chooses; image
    paths in cells resolve against `image_root`, else the dataset's directory."""
    dataset = open_dataset(path)
    columns = dataset_columns(dataset, fields, path)
    indices = chosen_indices(len(dataset), num_samples, seed, str(path))
    rows = dataset.with_format("arrow")[indices].to_pylist()  # the chosen rows only, in this order
    root = image_root or (path if path.is_dir() else path.parent)
    return [parse_record(row, root, record_name(path, i, row), columns) for i, row in zip(indices, rows, strict=True)]


def open_dataset(path: Path) -> datasets.Dataset:
    try:
        with _no_progress_bars():
            if path.is_dir() and any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
                loaded = datasets.load_from_disk(str(path))
                return one_split(loaded, path) if isinstance(loaded, datasets.DatasetDict) else loaded
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in DATASET_SUFFIXES)
            kinds = {f.suffix for f in files}
            if len(kinds) > 1:
                raise DataError(f"calibration data directory {path} mixes .parquet and .arrow files; pass one kind")
            if kinds == {".parquet"}:
                return datasets.Dataset.from_parquet([str(f) for f in files])
            return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, OSError) as err:
        cause = err.__cause__ or err  # the builder wraps the reader's own error
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{path}: cannot read it as a datasets dataset: {first_line}") from None


def one_split(splits: datasets.DatasetDict, path: Path) -> datasets.Dataset:
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    name = next(iter(splits))
    raise DataError(f"{path} holds the splits {', '.join(splits)} and no train split; pass one: --data {path / name}")


def dataset_columns(dataset: datasets.Dataset, fields: Fields, path: Path) -> Fields:
    """The columns holding image, question and answer: those named, else the common names; an
    image and a question column (or LLaVA `conversations`) must exist, an answer column may."""
    columns = dataset.column_names

    def column(named: str | None, common: tuple[str, ...], flag: str, what: str, required: bool) -> str | None:
        if named is not None:
            if named not in columns:
                raise DataError(f"{path}: no column {named!r} ({flag}); its columns are {', '.join(columns)}")
            return named
        found = next((name for name in common if name in columns), None)
        if found is None and required:
            raise DataError(
                f"{path}: no {what} column (looked for {', '.join(common)}); name it with {flag} "
                f"(its columns are {', '.join(columns)})"
            )
        return found

    return Fields(
        image=column(fields.image, IMAGE_FIELDS, "--image-column", "image", True),
        question=column(fields.question, QUESTION_FIELDS, "--question-column", "question",
                        "conversations" not in columns),
        answer=column(fields.answer, ANSWER_FIELDS, "--answer-column", "answer", False),
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets draws bars while it converts parquet; the calibrator draws its own."""
    enabled = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.enable_progress_bars()
