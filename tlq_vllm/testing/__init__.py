"""Offline fixtures (tiny VLMs of real architectures, sample data) for tests and benchmarks."""

from tlq_vllm.testing.fixtures import FIXTURES, build_fixture, cache_root

__all__ = ["FIXTURES", "build_fixture", "cache_root"]
