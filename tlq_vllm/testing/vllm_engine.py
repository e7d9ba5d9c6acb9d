"""A small vLLM engine for tests and benchmarks on CPU (imports vLLM: keep it out of the calibrator)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def vllm_engine(model_dir: Path | str, **kwargs) -> Iterator[object]:
    """A `vllm.LLM` sized for the tiny fixtures, shut down on exit (also when the body raises).

    enforce_eager skips torch.compile, which costs about a minute per engine on 2 cores and
    changes nothing that the tests check.
    """
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    options = dict(max_model_len=1024, limit_mm_per_prompt={"image": 1}, seed=0, enforce_eager=True)
    options.update(kwargs)
    llm = LLM(model=str(model_dir), **options)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
