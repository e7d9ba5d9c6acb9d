"""Compute kernels for the quantized layouts TLQ writes (no vLLM import: the plugin imports these)."""
