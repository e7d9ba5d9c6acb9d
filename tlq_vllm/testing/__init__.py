"""Offline fixtures for tests and benchmarks: the tiny VLMs (built by the library's tlq_vllm.models.tiny,
which `--model fixture:<name>` also uses) and a small vLLM engine helper (vllm_engine.py)."""

from tlq_vllm.models.tiny import FIXTURES, build_fixture
from tlq_vllm.paths import cache_root

__all__ = ["FIXTURES", "build_fixture", "cache_root"]
