"""Models that ship with (or are built by) tlq_vllm, addressable by name wherever a model is expected.

- `toyvlm`: the toy VLM trained on easy-vqa (benchmarks/toyvlm/train.py), committed under
  tlq_vllm/assets/toyvlm-easyvqa: the calibrator's default and the accuracy benchmark's model;
- `testbed`: toy VLM v2, trained on the procedural scenes (benchmarks/toyvlm2/train.py), committed
  under tlq_vllm/assets/toyvlm-scenes: the scene testbed's model (`--data scenes:calibration`);
- `fixture:<name>`: an offline tiny VLM with random weights (tlq_vllm.models.tiny), for tests;
  also `fixture:qwen2-vl-2b-width` (random weights at Qwen2-VL-2B's width) for weight-bound benchmarks.
"""

from __future__ import annotations

from tlq_vllm.models.tiny import build_fixture
from tlq_vllm.paths import TESTBED_DIR, TOYVLM_DIR


def resolve_builtin(name: str) -> str | None:
    """The local directory of a built-in model name, or None when `name` is not one.
    Raises ValueError for an unknown fixture or a missing toy VLM."""
    if name == "toyvlm":
        if not (TOYVLM_DIR / "config.json").is_file():
            raise ValueError(f"the toy VLM is missing from {TOYVLM_DIR} (python -m benchmarks.toyvlm.train)")
        return str(TOYVLM_DIR)
    if name == "testbed":
        if not (TESTBED_DIR / "config.json").is_file():
            raise ValueError(f"the testbed model is missing from {TESTBED_DIR} (benchmarks/gpu/train_toyvlm2.sh)")
        return str(TESTBED_DIR)
    if name.startswith("fixture:"):
        return str(build_fixture(name.split(":", 1)[1]))
    return None
