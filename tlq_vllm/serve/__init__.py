"""`python -m tlq_vllm.serve CHECKPOINT`: vLLM's OpenAI-compatible server with VLM presets."""
