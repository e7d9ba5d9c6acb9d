"""Quantization schemes: the integer grid of the weights and what happens to activations.

One small frozen dataclass per scheme, so the solver, the quantizer, the exporter and the vLLM
plugin all read the same facts. The grids are symmetric (zero point 0), matching
compressed-tensors' presets of the same names; W3A16 has no preset and is defined here the same
way as W4A16 with 3 bits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """A weight grid (bits, group size) plus the activation treatment at inference.

    group_size None means one scale per output channel ("channel" strategy).
    act_bits None means activations stay in the model dtype; 8 means dynamic per-token
    symmetric int8, computed at run time by the kernel (no calibrated activation scales).
    """

    name: str
    weight_bits: int
    group_size: int | None
    act_bits: int | None = None

    @property
    def qmax(self) -> int:
        """Largest integer of the symmetric grid, e.g. 7 for 4 bits."""
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Smallest integer of the symmetric grid, e.g. -8 for 4 bits."""
        return -(2 ** (self.weight_bits - 1))

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits is not None

    @property
    def compressed_tensors_format(self) -> str:
        """How compressed-tensors stores the weights: packed int32 for weight-only schemes, plain
        int8 tensors when activations are int8 too. W4A8 is int-quantized (int8 tensors holding
        int4 values) because that is what vLLM 0.32's CPU W4A8 path (Dynamic4bitLinearKernel)
        loads; as pack-quantized vLLM CPU would treat it as weight-only (bf16 activations).
        Stock vLLM on CUDA wants pack-quantized W4A8 (Marlin) instead: see docs/method.md."""
        return "int-quantized" if self.act_bits == 8 else "pack-quantized"


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("W4A16", weight_bits=4, group_size=128),
        Scheme("W3A16", weight_bits=3, group_size=128),
        Scheme("W2A16", weight_bits=2, group_size=64),
        Scheme("W8A16", weight_bits=8, group_size=128),
        Scheme("W8A8", weight_bits=8, group_size=None, act_bits=8),
        Scheme("W4A8", weight_bits=4, group_size=128, act_bits=8),
    )
}


def get_scheme(name: str) -> Scheme:
    """Looks a scheme up by name (case-insensitive), with an error that lists the choices."""
    scheme = SCHEMES.get(name.upper())
    if scheme is None:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    return scheme
