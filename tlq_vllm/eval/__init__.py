"""VQA evaluation of FP and quantized checkpoints: through a served endpoint or transformers.

`python -m tlq_vllm.eval --help`; docs/accuracy.md. The accuracy benchmark
(`python -m benchmarks.accuracy`) runs it over its method x scheme x seed matrix.
"""

from tlq_vllm.eval.vqa import VQAItem, load_items, normalize_answer, vqa_score

__all__ = ["VQAItem", "load_items", "normalize_answer", "vqa_score"]
