"""A compressed-tensors `pack-quantized` weight-only scheme: packed low-bit kernels where stock vLLM has none.

Checkpoint layout (compressed-tensors 0.17, symmetric): `weight_packed` int32
[out, ceil(in / (32 // bits))] holding 32 // bits values per word (10 for 3 bits, 2 bits unused),
`weight_scale` [out, in / group] in the model dtype ([out, 1] per channel), `weight_shape` [2].

Kernels. The kernel is chosen per layer in `create_weights` (`choose_cpu_kernel`, shapes known) and
the checkpoint's words are repacked for it only in `process_weights_after_loading`:
- CUDA, 3-bit: tlq_vllm.kernels.w3a16.w3a16_linear: a Triton kernel dequantizes the packed words
  on every call (one pass) and cuBLAS multiplies; only the packed weight stays resident.
- CUDA, 2-bit (W2A16, a stress setting of the accuracy benchmark): dequantize once, the logged last
  resort (no packed 2-bit CUDA kernel here).
- CPU ("auto" takes the first that can run the layer: this order on CPUs with AMX, torch-int4 before
  vllm on the others, see `auto_kernel_order`):
    vllm        vLLM's CPUWNA16LinearKernel (`cpu_gemm_wna16`, in vLLM's AVX-512 CPU builds only):
                2-, 3- and 4-bit integers rewritten as compressed-tensors' 4-bit words (uint4b8), which
                that kernel blocks as it does for stock W4A16 checkpoints;
    torch-int4  torch's `_weight_int4pack_mm_for_cpu` (AVX-512, AVX2 and a default kernel): 2-, 3- and
                4-bit integers on the int4 grid (2- and 3-bit ones then take int4's memory and time),
                tlq_vllm.kernels.cpu_wna16; from
                `cpu_wna16.INT4_DEQUANTIZE_MIN_M` rows (prefill) each call dequantizes the packed weight
                for itself and runs a bf16 GEMM (the int4 kernel is fp32-FMA bound there), chosen per call;
    torch-int8  torch's `_weight_int8pack_mm`: 8-bit integers with one scale per output channel (it
                has no groups, so the group-128 W8A16 preset does not qualify);
    dequantize  the last resort: dequantize once after loading into a weight cache in the model
                dtype and run a plain GEMM (the memory and speed of the unquantized layer).
  `TLQ_CPU_WNA16_KERNEL=vllm|torch-int4|torch-int8|dequantize` (read at load) forces one kernel for
  every layer of this scheme; a layer it cannot run is an error naming why.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsScheme
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)
from vllm.platforms import current_platform

from tlq_vllm.calibrate.hostmem import release_free_heap
from tlq_vllm.kernels import cpu_wna16
from tlq_vllm.vllm_plugin import env_choice

logger = init_logger("vllm.tlq")  # under "vllm", whose handlers vLLM configures

KERNEL_ENV = "TLQ_CPU_WNA16_KERNEL"
CPU_KERNELS = ("vllm", "torch-int4", "torch-int8", "dequantize")  # "auto": see auto_kernel_order
_logged: set[tuple[str, str]] = set()


def log_kernel_once(label: str, kernel: str, detail: str = "") -> None:
    """The one line per (scheme, kernel) that says which kernel serves the layers ("tlq: W3A16 layers use ...");
    `detail` (why, from the first such layer) does not make another line."""
    if (label, kernel) not in _logged:
        _logged.add((label, kernel))
        logger.info("tlq: %s layers use %s%s", label, kernel, detail)


def forget_logged_kernels() -> None:
    """Start a new model load: its schemes log their kernels again."""
    _logged.clear()


def requested_cpu_kernel() -> str:
    """`TLQ_CPU_WNA16_KERNEL` (default "auto"), checked against the kernels there are."""
    return env_choice(KERNEL_ENV, "auto", CPU_KERNELS, f"choose auto or one of {', '.join(CPU_KERNELS)}")


def cpu_has_wna16_gemm() -> bool:
    """Whether this vLLM CPU build has `cpu_gemm_wna16` (its AVX-512 builds do, AVX2 does not)."""
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def _vllm_wna16_config(num_bits: int, group_size: int | None, input_size: int, output_size: int,
                       in_features: int, out_features: int, dtype: torch.dtype):
    """vLLM's description of the layer as its CPUWNA16 kernel would see it: 4-bit `uint4b8` (3-bit integers are
    rewritten as 4-bit ones), no zero points."""
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    return MPLinearLayerConfig(full_weight_shape=(input_size, output_size),
                               partition_weight_shape=(in_features, out_features), weight_type=scalar_types.uint4b8,
                               act_type=dtype, group_size=-1 if group_size is None else group_size, zero_points=False)


def unsupported_reasons(num_bits: int, group_size: int | None, in_features: int, out_features: int,
                        vllm_config=None) -> dict[str, str | None]:
    """For each CPU kernel, why it cannot run this layer (None: it can)."""
    group = in_features if group_size is None else group_size
    if num_bits > 4:
        vllm = "vLLM's CPU WNA16 kernel is 4-bit only"
    elif not cpu_has_wna16_gemm():
        vllm = "this vLLM build has no cpu_gemm_wna16 (vLLM builds it for AVX-512 CPUs only)"
    else:
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

        ok, why = CPUWNA16LinearKernel.can_implement(vllm_config)
        vllm = None if ok else why
    return {
        "vllm": vllm,
        "torch-int4": cpu_wna16.int4pack_unsupported(out_features, in_features, group, num_bits),
        "torch-int8": (f"{num_bits}-bit weights are not int8" if num_bits != 8
                       else cpu_wna16.int8pack_unsupported(in_features, group)),
        "dequantize": None,
    }


def auto_kernel_order(has_amx: bool) -> tuple[str, ...]:
    """The order "auto" tries the CPU kernels in. vLLM's kernel dequantizes the whole weight into a bf16
    buffer on every call and then multiplies (AMX tiles where the CPU has them, else its "vec" path).
    Without AMX that measured 2-4x slower than torch's int4 kernel at M = 1-4 (0.98-2.4x at M = 16) and
    slower than vLLM's bf16 GEMM at M = 1 (AMD EPYC, AVX-512, 2 cores, Qwen2-VL-2B shapes), so torch's
    int4 kernel goes first there; with AMX vLLM's goes first (its W4A16 served 2.2x BF16's decode speed
    on an AMX Xeon, issue 16; torch's int4 kernel is not measured there yet)."""
    return CPU_KERNELS if has_amx else ("torch-int4", "vllm", "torch-int8", "dequantize")


def choose_cpu_kernel(reasons: dict[str, str | None], requested: str, order: tuple[str, ...] = CPU_KERNELS) -> str:
    """The requested kernel (an error where it cannot run), or for "auto" the first in `order` that can."""
    if requested != "auto":
        if reasons[requested] is not None:
            raise ValueError(f"{KERNEL_ENV}={requested} cannot run this layer: {reasons[requested]}; "
                             f"unset {KERNEL_ENV} to let tlq pick a kernel")
        return requested
    return next(kernel for kernel in order if reasons[kernel] is None)


class TLQPackedWNA16Scheme(CompressedTensorsScheme):
    """Symmetric int{2,3,4,8} weights (groups, or one scale per channel on CPU) in compressed-tensors' packed layout."""

    def __init__(self, num_bits: int, group_size: int | None):
        self.num_bits = num_bits
        self.group_size = group_size  # None: one scale per output channel
        self.pack_factor = 32 // num_bits  # values per int32 word, as compressed-tensors packs them
        self.kernel: str | None = None  # "triton" or one of CPU_KERNELS, chosen in create_weights
        self.vllm_kernel = None  # vLLM's CPUWNA16LinearKernel when kernel == "vllm"
        self.prefill_gemm = "bf16"  # the GEMM of torch-int4's dequantize path (cpu_wna16.gemm_dtype), as logged

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @property
    def label(self) -> str:
        return f"W{self.num_bits}A16"

    def kernel_name(self) -> str:
        """What serves this scheme's layers, as the log line says it (after create_weights)."""
        repacked = f" ({self.num_bits}-bit integers repacked to int4)" if self.num_bits < 4 else ""
        where = " (CPU)" if current_platform.is_cpu() else ""
        return {
            None: "a kernel chosen per layer at load",
            "triton": "TLQ Triton W3A16 kernel",
            "vllm": f"vLLM CPUWNA16LinearKernel{repacked}",
            "torch-int4": f"torch _weight_int4pack_mm_for_cpu{repacked} below "
                          f"{cpu_wna16.INT4_DEQUANTIZE_MIN_M} rows, from there dequantized per call + "
                          f"{self.prefill_gemm} GEMM",
            "torch-int8": "torch _weight_int8pack_mm (per-channel int8)",
            "dequantize": f"TLQ dequantize-once W{self.num_bits}A16{where}: bf16 weights, plain GEMM",
        }[self.kernel]

    def create_weights(self, layer: torch.nn.Module, output_size: int, input_size: int,
                       output_partition_sizes: list[int], input_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: Callable, **kwargs) -> None:
        out_features = sum(output_partition_sizes)
        group = input_size_per_partition if self.group_size is None else self.group_size
        if input_size_per_partition % group:
            raise ValueError(
                f"tlq W{self.num_bits}A16: input features per partition {input_size_per_partition} are not a "
                f"multiple of the group size {group}; use a smaller tensor-parallel size"
            )
        if input_size_per_partition != input_size and input_size_per_partition % self.pack_factor:
            raise ValueError(
                f"tlq W{self.num_bits}A16: a row-parallel split of {input_size} input features into "
                f"{input_size_per_partition} does not fall on a packed word ({self.pack_factor} values); "
                "use tensor-parallel size 1 for this checkpoint"
            )
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = out_features
        layer.params_dtype = params_dtype
        self._choose_kernel(input_size, output_size, input_size_per_partition, out_features, params_dtype)
        packed = PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=self.pack_factor, weight_loader=weight_loader,
            data=torch.empty(out_features, math.ceil(input_size_per_partition / self.pack_factor), dtype=torch.int32),
        )
        scale_data = torch.empty(out_features, input_size_per_partition // group, dtype=params_dtype)
        if self.group_size is None:
            scales = ChannelQuantScaleParameter(output_dim=0, weight_loader=weight_loader, data=scale_data)
        else:
            scales = GroupQuantScaleParameter(input_dim=1, output_dim=0, weight_loader=weight_loader, data=scale_data)
        shape = BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        layer.register_parameter("weight_packed", packed)
        layer.register_parameter("weight_scale", scales)
        layer.register_parameter("weight_shape", shape)

    def _choose_kernel(self, input_size: int, output_size: int, in_features: int, out_features: int,
                       dtype: torch.dtype) -> None:
        if current_platform.is_cuda_alike():  # config routes only 2- and 3-bit, grouped weights here on CUDA
            self.kernel = "triton" if self.num_bits == 3 else "dequantize"
            detail = "" if self.kernel == "triton" else f" [last resort: no packed {self.num_bits}-bit CUDA kernel]"
            log_kernel_once(self.label, self.kernel_name(), detail)
            return
        vllm_config = _vllm_wna16_config(self.num_bits, self.group_size, input_size, output_size,
                                         in_features, out_features, dtype)
        reasons = unsupported_reasons(self.num_bits, self.group_size, in_features, out_features, vllm_config)
        requested = requested_cpu_kernel()
        self.kernel = choose_cpu_kernel(reasons, requested, auto_kernel_order(torch.cpu._is_amx_tile_supported()))
        self.prefill_gemm = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(cpu_wna16.gemm_dtype(dtype), "float32")
        if self.kernel == "vllm":
            from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

            self.vllm_kernel = CPUWNA16LinearKernel(vllm_config, w_q_param_name="weight_packed",
                                                    w_s_param_name="weight_scale",
                                                    w_zp_param_name="weight_zero_point")
        detail = ""
        if requested != "auto":
            detail = f" (forced by {KERNEL_ENV}={requested})"
        elif self.kernel == "dequantize":
            why = "; ".join(f"{k}: {r}" for k, r in reasons.items() if r is not None)
            detail = f" [last resort, no packed kernel runs these layers: {why}]"
        log_kernel_once(self.label, self.kernel_name(), detail)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._repack(layer)
        # The repack's temporaries ([out, in] integers, tens of MiB at 2B width) are freed between the packed
        # weights that stay, where glibc keeps their pages: measured at Qwen2-VL-2B width (AMD EPYC AVX-512,
        # 2026-12-04), a W4A16 server held 415 MiB more without this.
        release_free_heap()

    def _repack(self, layer: torch.nn.Module) -> None:
        """The checkpoint's words -> what self.kernel reads; the checkpoint's tensors are released."""
        packed = layer.weight_packed.data  # [out, ceil(in / pack_factor)] int32
        scales = layer.weight_scale.data  # [out, in / group]
        in_features, dtype = layer.input_size_per_partition, layer.params_dtype
        group = in_features if self.group_size is None else self.group_size
        if self.kernel == "triton":
            layer.weight_packed = torch.nn.Parameter(packed.contiguous(), requires_grad=False)
            layer.weight_scale = torch.nn.Parameter(scales.contiguous(), requires_grad=False)
            return
        if self.kernel == "dequantize":
            weight = dequantize_packed(packed, scales, self.num_bits, group, in_features, dtype)
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)  # [out, in], the CPU cache
            del layer.weight_packed, layer.weight_scale, layer.weight_shape
            return
        q = unpack_packed(packed, self.num_bits, in_features)  # [out, in] signed integers
        if self.kernel == "vllm":
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            layer.weight_packed.data = pack_to_int32(q, 4)  # [out, in / 8]: the 4-bit words vLLM's kernel reads
            del layer.weight_shape
            self.vllm_kernel.process_weights_after_loading(layer)
            return
        if self.kernel == "torch-int4":
            weight, sz, kernel_group = cpu_wna16.pack_int4(q, scales, group, dtype)
            layer.weight_int4 = torch.nn.Parameter(weight, requires_grad=False)  # [out, in / 2] uint8
            layer.scales_and_zeros = torch.nn.Parameter(sz, requires_grad=False)  # [in / g, out, 2]
            layer.int4_group_size = kernel_group
        else:  # torch-int8
            weight, channel_scales = cpu_wna16.pack_int8(q, scales, dtype)
            layer.weight_int8 = torch.nn.Parameter(weight, requires_grad=False)  # [out, in] int8
            layer.channel_scales = torch.nn.Parameter(channel_scales, requires_grad=False)  # [out]
        del layer.weight_packed, layer.weight_scale, layer.weight_shape

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "vllm":
            return self.vllm_kernel.apply_weights(layer, x, bias)
        if self.kernel == "torch-int4":
            return cpu_wna16.int4pack_linear(x, layer.weight_int4, layer.scales_and_zeros, layer.int4_group_size,
                                             bias)
        if self.kernel == "torch-int8":
            return cpu_wna16.int8pack_linear(x, layer.weight_int8, layer.channel_scales, bias)
        if self.kernel == "dequantize":
            return F.linear(x, layer.weight, bias)
        from tlq_vllm.kernels.w3a16 import w3a16_linear

        return w3a16_linear(x, layer.weight_packed, layer.weight_scale, bias, group_size=self.group_size)


def unpack_packed(packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """compressed-tensors' own unpacking: int32 words [out, ceil(in / (32 // bits))] -> signed int8 [out, in]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, num_bits, torch.Size([packed.shape[0], in_features]))


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, num_bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' unpacking times the group scales -> [out, in] in dtype."""
    out_features = packed.shape[0]
    q = unpack_packed(packed, num_bits, in_features)  # [out, in] signed
    w = q.float().reshape(out_features, in_features // group_size, group_size) * scales.float().unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)  # [out, in]
