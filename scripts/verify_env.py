"""Checks that the CPU serving stack imports together (run by scripts/setup.sh)."""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import compressed_tensors  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
import vllm  # noqa: E402
from transformers import Qwen2VLImageProcessor  # noqa: E402,F401

import tlq_vllm  # noqa: E402

print(
    f"verify: torch {torch.__version__}, torchvision {torchvision.__version__}, "
    f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}, "
    f"vllm {vllm.__version__}, tlq_vllm {tlq_vllm.__version__}"
)
