"""tlq-vllm: TLQ post-training quantization calibration for vision-language models, served by vLLM."""

__version__ = "0.1.0"
