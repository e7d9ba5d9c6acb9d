"""Per-architecture adapters: the only place that knows where a VLM keeps its parts."""

from tlq_vllm.models.adapters import (
    ADAPTERS,
    ModelAdapter,
    adapter_for_model_type,
    rename_saved_keys,
    supported_model_types,
)

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for_model_type", "rename_saved_keys", "supported_model_types"]
