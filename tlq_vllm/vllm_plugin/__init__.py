"""The `tlq` quantization method for vLLM (imports vLLM: the calibrator never imports this package).

Registered from the `vllm.general_plugins` entry point, so every vLLM process (API server, engine
core, workers) runs `register()`; it is idempotent.
"""

from __future__ import annotations

import os

PLUGIN_NAME = "tlq"
# Serve-time options the plugin reads from the environment (set by `python -m tlq_vllm.serve`); stated here,
# where importing them needs no vLLM.
LM_HEAD_ENV = "TLQ_LM_HEAD"  # int8_vocab: the lm_head and embeddings as int8 rows on CPU
LM_HEAD_CHOICES = ("bf16", "int8")  # bf16: the model dtype, as loaded (the default)


def env_choice(name: str, default: str, choices: tuple[str, ...], advice: str) -> str:
    """Environment option `name`, lower-cased (unset or empty: default); a value that is neither the default nor
    one of choices is a ValueError "NAME='value': <advice>"."""
    value = os.environ.get(name, default).strip().lower() or default
    if value != default and value not in choices:
        raise ValueError(f"{name}={value!r}: {advice}")
    return value


def register() -> None:
    """Registers the `tlq` quantization config with vLLM once per process."""
    from vllm.model_executor.layers.quantization import _CUSTOMIZED_METHOD_TO_QUANT_CONFIG as registered
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from tlq_vllm.vllm_plugin.config import TLQConfig

    if PLUGIN_NAME in QUANTIZATION_METHODS and registered.get(PLUGIN_NAME) is TLQConfig:
        return
    register_quantization_config(PLUGIN_NAME)(TLQConfig)
