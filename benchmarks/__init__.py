"""Benchmarks: serving throughput and latency, linear kernels, and the RTX 3090 projection."""
