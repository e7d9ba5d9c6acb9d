"""Reading records from files: what the calibrator's data and the evaluation's VQA sets share.

One record per JSONL line or list item; every error names where it is (`file.jsonl:12`) and what
is wrong, so a bad record is one clear line, never a traceback or a silently skipped item.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad data (calibration records, evaluation items): the message names the record and what is wrong."""


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


def resolve_image(name: str, root: Path, where: str) -> Path:
    """An image path: absolute as it is, relative against `root` (the data file's directory or
    --image-root); the file must exist."""
    path = (root / Path(name).expanduser()).resolve()
    if not path.is_file():
        raise DataError(f"{where}: image {name!r} not found ({path})")
    return path
