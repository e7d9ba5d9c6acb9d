"""Scene images as PNG files in the cache, for the tools that take image paths (calibration
records, VQA items, the endpoint backend's data URLs).

A file is written once (to a temporary name, then renamed, so a reader never sees half a file)
under `<cache root>/scenes/v<GENERATOR_VERSION>/<split>/<index>.png`; the version in the path
keeps a changed generator from reading old images.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tlq_vllm.paths import cache_root
from tlq_vllm.scenes.render import render, sample_scene
from tlq_vllm.scenes.splits import GENERATOR_VERSION, check_split


def image_file(split: str, index: int) -> Path:
    check_split(split)
    path = cache_root() / "scenes" / f"v{GENERATOR_VERSION}" / split / f"{index}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{index}-", suffix=".png", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                render(sample_scene(split, index)).save(f, format="PNG")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
