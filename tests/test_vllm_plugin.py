"""The `tlq` vLLM quantization method: registration, checkpoint detection, the packed WNA16 path."""

import json
import shutil

import pytest
import torch

from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.quantizer import compute_scales, dequantize, quantize
from tlq_vllm.calibrate.schemes import SCHEMES


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from tlq_vllm.vllm_plugin import register
    from tlq_vllm.vllm_plugin.config import TLQConfig

    register()
    register()
    assert QUANTIZATION_METHODS.count("tlq") == 1
    assert get_quantization_config("tlq") is TLQConfig


def test_detection_of_tlq_checkpoints():
    from tlq_vllm.vllm_plugin.config import TLQConfig

    tlq = {"quant_method": "compressed-tensors", "tlq": {"method": "tlq"}}
    plain = {"quant_method": "compressed-tensors"}
    assert TLQConfig.override_quantization_method(tlq, None) == "tlq"
    assert TLQConfig.override_quantization_method(tlq, "tlq") == "tlq"
    assert TLQConfig.override_quantization_method(tlq, "compressed-tensors") is None  # stock vLLM on request
    assert TLQConfig.override_quantization_method(plain, None) is None
    with pytest.raises(ValueError, match="needs a TLQ checkpoint"):
        TLQConfig.override_quantization_method(plain, "tlq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_dequantization_equals_the_calibrators_weights(bits):
    """compressed-tensors' packing, then the plugin's unpack + scales = the calibrator's dequantize."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from tlq_vllm.vllm_plugin.packed_wna16 import dequantize_packed

    scheme = {2: SCHEMES["W2A16"], 3: SCHEMES["W3A16"], 4: SCHEMES["W4A16"], 8: SCHEMES["W8A16"]}[bits]
    torch.manual_seed(bits)
    weight = torch.randn(96, 384)
    scales = compute_scales(weight, scheme, scale_dtype=torch.bfloat16)
    q = quantize(weight, scales, scheme)
    packed = pack_to_int32(q, bits)  # [96, ceil(384 / (32 // bits))] int32
    assert packed.shape == (96, -(-384 // (32 // bits)))
    got = dequantize_packed(packed, scales.to(torch.bfloat16), bits, scheme.group_size, 384, torch.bfloat16)
    assert torch.equal(got, dequantize(q, scales, scheme, torch.bfloat16))


@pytest.mark.slow
def test_quantization_tlq_on_a_plain_checkpoint_is_refused(tmp_path):
    """`--quantization tlq` on a compressed-tensors checkpoint without TLQ's block: a clear error."""
    from tlq_vllm.testing.vllm_engine import vllm_engine

    out = run(CalibrationConfig(model="fixture:qwen2-vl", scheme="W8A8", method="rtn",
                                output=str(tmp_path / "ckpt"), progress=False))
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]["tlq"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="needs a TLQ checkpoint"):
        with vllm_engine(plain, quantization="tlq"):
            pass


# ---------------------------------------------------------------------------------------------
# CPU kernels of the packed weight-only scheme (TLQ_CPU_WNA16_KERNEL)
# ---------------------------------------------------------------------------------------------


def test_cpu_kernel_choice():
    """auto with AMX: vLLM's kernel, else torch's int4, else torch's int8, else dequantize-once; without
    AMX torch's int4 first; forcing one that cannot run the layer is an error that says why."""
    from tlq_vllm.vllm_plugin.packed_wna16 import auto_kernel_order, choose_cpu_kernel

    all_run = {"vllm": None, "torch-int4": None, "torch-int8": None, "dequantize": None}
    no_vllm = {**all_run, "vllm": "this vLLM build has no cpu_gemm_wna16"}
    grouped_int8 = {**all_run, "vllm": "4-bit only", "torch-int4": "8-bit", "torch-int8": "one scale per channel"}
    amx, no_amx = auto_kernel_order(has_amx=True), auto_kernel_order(has_amx=False)
    assert choose_cpu_kernel(all_run, "auto", amx) == "vllm"
    assert choose_cpu_kernel(all_run, "auto", no_amx) == "torch-int4"
    assert choose_cpu_kernel({**all_run, "torch-int4": "output features 40"}, "auto", no_amx) == "vllm"
    assert choose_cpu_kernel(no_vllm, "auto", amx) == "torch-int4"
    assert choose_cpu_kernel(grouped_int8, "auto", amx) == "dequantize"
    assert choose_cpu_kernel(grouped_int8, "auto", no_amx) == "dequantize"
    assert choose_cpu_kernel(all_run, "torch-int4") == "torch-int4"
    with pytest.raises(ValueError, match="TLQ_CPU_WNA16_KERNEL=vllm cannot run this layer: this vLLM build"):
        choose_cpu_kernel(no_vllm, "vllm")


def test_cpu_kernel_env_is_checked(monkeypatch):
    from tlq_vllm.vllm_plugin.packed_wna16 import requested_cpu_kernel

    monkeypatch.delenv("TLQ_CPU_WNA16_KERNEL", raising=False)
    assert requested_cpu_kernel() == "auto"
    monkeypatch.setenv("TLQ_CPU_WNA16_KERNEL", "Torch-Int4")
    assert requested_cpu_kernel() == "torch-int4"
    monkeypatch.setenv("TLQ_CPU_WNA16_KERNEL", "int4")
    with pytest.raises(ValueError, match="choose auto or one of vllm, torch-int4, torch-int8, dequantize"):
        requested_cpu_kernel()


@pytest.mark.parametrize("bits, group, expected", [
    (2, 64, {"torch-int8"}),
    (3, 128, {"torch-int8"}),
    (4, 128, {"torch-int8"}),
    (8, 128, {"vllm", "torch-int4", "torch-int8"}),  # the W8A16 preset: dequantize-once, and why
    (8, None, {"vllm", "torch-int4"}),  # per channel: torch's int8 kernel
])
def test_cpu_kernels_that_cannot_run_a_layer(bits, group, expected):
    from tlq_vllm.vllm_plugin.packed_wna16 import _vllm_wna16_config, cpu_has_wna16_gemm, unsupported_reasons

    config = _vllm_wna16_config(bits, group, 384, 96, 384, 96, torch.bfloat16)
    reasons = unsupported_reasons(bits, group, 384, 96, config)
    if not cpu_has_wna16_gemm() and bits < 8:
        expected = expected | {"vllm"}
    assert {kernel for kernel, why in reasons.items() if why} == expected


@pytest.fixture(scope="module")
def rtn_checkpoint(tmp_path_factory):
    """RTN checkpoints of the tiny Qwen2-VL, one per scheme, written by the calibrator (~20 s each)."""
    written = {}

    def checkpoint(scheme: str):
        if scheme not in written:
            out = tmp_path_factory.mktemp(f"rtn_{scheme.lower()}")
            written[scheme] = run(CalibrationConfig(model="fixture:qwen2-vl", scheme=scheme, method="rtn",
                                                    output=str(out), progress=False))
        return written[scheme]

    return checkpoint


class _Served:
    """One vLLM load of a checkpoint with TLQ_CPU_WNA16_KERNEL set: kernels, log lines, weight bytes, greedy output."""

    def __init__(self, checkpoint, kernel: str, image, env: dict[str, str] | None = None):
        extra_env = dict(env or {})
        import logging

        from vllm import SamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.logger import configure_logging_if_needed

        from tlq_vllm.testing.vllm_engine import vllm_engine

        class Lines(logging.Handler):
            def __init__(self):
                super().__init__()
                self.lines: list[str] = []

            def emit(self, record):
                self.lines.append(record.getMessage())

        def packed_layers(model):
            """Per quantized linear: (the scheme's kernel, bytes held, bytes of the same weight in bf16)."""
            return [(m.scheme.kernel, sum(p.nbytes for p in m.parameters(recurse=False) if p is not m.bias),
                     2 * m.input_size_per_partition * m.output_size_per_partition)
                    for _, m in model.named_modules() if type(getattr(m, "scheme", None)).__name__
                    == "TLQPackedWNA16Scheme"]

        def vocab_tables(model):
            """Per vocabulary table (embeddings, lm_head): its quant method, the bytes it holds itself, and whether
            vLLM's CPU GEMM dispatch gave it a handle (`cpu_linear`: on oneDNN CPUs a packed copy of the table)."""
            from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

            tables = [m for _, m in model.named_modules() if isinstance(m, VocabParallelEmbedding)]
            return ([(type(m.quant_method).__name__, sum(p.nbytes for p in m.parameters(recurse=False)),
                      hasattr(m, "cpu_linear")) for m in tables],
                    (tables[0].num_embeddings_padded, tables[0].embedding_dim))

        # vLLM applies its logging configuration (a dictConfig, which resets the handlers of loggers under
        # "vllm") when the first engine of a process starts: apply it first, so the handler stays attached.
        configure_logging_if_needed(EngineArgs(model=str(checkpoint)).create_logging_config())
        handler, tlq_logger = Lines(), logging.getLogger("vllm.tlq")
        tlq_logger.addHandler(handler)
        try:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("TLQ_CPU_WNA16_KERNEL", kernel)
                for key, value in extra_env.items():
                    env.setenv(key, value)
                with vllm_engine(checkpoint) as llm:
                    (self.layers,) = llm.apply_model(packed_layers)
                    ((self.vocab, self.vocab_shape),) = llm.apply_model(vocab_tables)
                    request = [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                                            {"type": "text", "text": "What shape is it?"}]}]
                    greedy = SamplingParams(max_tokens=8, temperature=0, logprobs=2)
                    self.output = llm.chat(request, greedy)[0].outputs[0]
        finally:
            tlq_logger.removeHandler(handler)
        self.kernels = {kernel for kernel, _, _ in self.layers}
        self.log = [line for line in handler.lines if line.startswith("tlq: ")]
        self.weight_ratio = sum(held for _, held, _ in self.layers) / sum(bf16 for _, _, bf16 in self.layers)


# Near-ties: the tiny random model's next-token distribution is nearly flat (top logprobs around
# -5.3, top-2 gaps down to 0.01 nats), and the kernels differ from the dequantize-once reference
# by bf16 rounding (seen: top logprobs within 0.005). Greedy tokens must agree up to the first
# position where the reference's top-2 gap is under NEAR_TIE, which could flip legitimately.
NEAR_TIE = 0.05
LOGPROB_TOL = 0.05
KERNEL_LOG_NAMES = {"vllm": "vLLM CPUWNA16LinearKernel", "torch-int4": "torch _weight_int4pack_mm_for_cpu",
                    "dequantize": "TLQ dequantize-once"}


def _assert_greedy_agrees(got, reference):
    compared = 0
    for token, ref_token, ref_logprobs, logprobs in zip(got.token_ids, reference.token_ids, reference.logprobs,
                                                        got.logprobs, strict=True):
        top2 = sorted((lp.logprob for lp in ref_logprobs.values()), reverse=True)[:2]
        assert token == ref_token, f"greedy tokens differ at {compared}: {got.token_ids} vs {reference.token_ids}"
        assert abs(logprobs[token].logprob - ref_logprobs[token].logprob) <= LOGPROB_TOL
        compared += 1
        if len(top2) == 2 and top2[0] - top2[1] < NEAR_TIE:
            break
    assert compared >= 1


@pytest.fixture(scope="module")
def dequantize_reference(rtn_checkpoint, sample_image):
    served = {}

    def reference(scheme: str) -> _Served:
        if scheme not in served:
            served[scheme] = _Served(rtn_checkpoint(scheme), "dequantize", sample_image)
        return served[scheme]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["vllm", "torch-int4"])
@pytest.mark.parametrize("scheme", ["W4A16", "W3A16", "W2A16"])
def test_cpu_kernel_serves_like_the_dequantize_reference(rtn_checkpoint, dequantize_reference, sample_image,
                                                         scheme, kernel):
    """W4A16 / W3A16 / W2A16 through a forced packed kernel: the one log line names it, the layers hold packed
    weights (under 30% of bf16's bytes), and greedy decoding agrees with dequantize-once."""
    from tlq_vllm.vllm_plugin.packed_wna16 import cpu_has_wna16_gemm

    if kernel == "vllm" and not cpu_has_wna16_gemm():
        pytest.skip("this vLLM build has no cpu_gemm_wna16 (vLLM builds it for AVX-512 CPUs only); "
                    "the torch-int4 case covers this machine")
    reference = dequantize_reference(scheme)
    assert reference.kernels == {"dequantize"} and reference.weight_ratio == 1.0
    assert reference.log == [f"tlq: {scheme} layers use TLQ dequantize-once {scheme} (CPU): bf16 weights, plain "
                             "GEMM (forced by TLQ_CPU_WNA16_KERNEL=dequantize)"]
    served = _Served(rtn_checkpoint(scheme), kernel, sample_image)
    assert served.kernels == {kernel}
    (line,) = served.log
    assert line.startswith(f"tlq: {scheme} layers use {KERNEL_LOG_NAMES[kernel]}"), line
    assert ("repacked to int4" in line) == (scheme in ("W3A16", "W2A16"))
    assert served.weight_ratio < 0.3, served.weight_ratio
    _assert_greedy_agrees(served.output, reference.output)


@pytest.mark.slow
def test_grouped_w8a16_falls_back_to_dequantize_once_and_says_why(rtn_checkpoint, sample_image):
    served = _Served(rtn_checkpoint("W8A16"), "auto", sample_image)
    assert served.kernels == {"dequantize"}
    assert len(served.log) == 1, served.log
    (line,) = served.log
    assert line.startswith("tlq: W8A16 layers use TLQ dequantize-once W8A16 (CPU)")
    assert "last resort" in line and "one scale per output channel" in line
    assert len(served.output.token_ids) > 0


@pytest.mark.parametrize("bits, kernel", [(3, "triton"), (2, "dequantize")])
def test_cuda_kernel_choice_for_the_schemes_stock_vllm_cannot_serve(monkeypatch, bits, kernel):
    """On CUDA (the platform faked: no GPU here) 3-bit layers get the Triton kernel and 2-bit ones
    dequantize-once, whose one log line says it is the last resort."""
    import types

    from tlq_vllm.vllm_plugin import packed_wna16

    cuda = types.SimpleNamespace(is_cuda_alike=lambda: True, is_cpu=lambda: False)
    monkeypatch.setattr(packed_wna16, "current_platform", cuda)
    lines = []
    monkeypatch.setattr(packed_wna16, "log_kernel_once", lambda label, name, detail="": lines.append(
        f"{label} layers use {name}{detail}"))
    scheme = packed_wna16.TLQPackedWNA16Scheme(bits, 64)
    scheme._choose_kernel(256, 128, 256, 128, torch.bfloat16)
    assert scheme.kernel == kernel
    expected = {3: "W3A16 layers use TLQ Triton W3A16 kernel",
                2: "W2A16 layers use TLQ dequantize-once W2A16: bf16 weights, plain GEMM [last resort: no packed "
                   "2-bit CUDA kernel]"}[bits]
    assert lines == [expected]
