"""benchmarks/common.py: machine facts read from /proc/cpuinfo's format, the words reports build from
them, model sizes from safetensors headers, results files and Markdown tables."""

import json

import pytest
import torch

from benchmarks import common

# Two /proc/cpuinfo processors as Linux writes them (key, tab padding, colon), trimmed.
CPUINFO_XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
CPUINFO_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"


def test_parse_cpuinfo():
    assert common.parse_cpuinfo(CPUINFO_XEON) == (
        "Intel(R) Xeon(R) Platinum 8480+",
        ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"])
    assert common.parse_cpuinfo(CPUINFO_EPYC) == ("AMD EPYC 7B13", ["avx2"])
    assert common.parse_cpuinfo("") == ("unknown", [])
    facts = common.cpu_facts()  # this machine: whatever it is, the facts are well formed
    assert set(facts) == {"cpu_model", "isa_flags", "logical_cpus", "usable_cpus"}
    assert set(facts["isa_flags"]) <= set(common.ISA_FLAGS) and 1 <= facts["usable_cpus"] <= facts["logical_cpus"]


def test_isa_and_architecture_words():
    assert common.describe_isa(["avx2"]) == "with AVX2 but no AVX-512"
    assert common.describe_isa(common.parse_cpuinfo(CPUINFO_XEON)[1]) == "with AVX-512, VNNI, AVX-512 BF16 and AMX"
    assert common.describe_isa(["avx2", "avx512f"]) == "with AVX-512"
    assert common.describe_isa([]) == "with neither AVX2 nor AVX-512"
    assert common.describe_isa(None) == "whose ISA flags were not recorded"
    assert common.architecture("Linux-6.1-x86_64-with-glibc2.36", []) == "x86"
    assert common.architecture("Linux-6.1-aarch64-with-glibc2.36", []) == "Arm"
    assert common.architecture(None, ["avx2"]) == "x86" and common.architecture(None, None) is None


def test_kernel_notes():
    assert "dequantize-once fallback" in common.kernel_note("TLQ dequantize-once W3A16 (CPU)")
    assert "portable scalar kernel" in common.kernel_note("Dynamic4bitLinearKernel", "x86")
    assert "portable" not in common.kernel_note("Dynamic4bitLinearKernel", "Arm")
    assert "torch's packed int4" in common.kernel_note("torch _weight_int4pack_mm_for_cpu (3-bit integers repacked)")
    assert common.kernel_note("MacheteLinearKernel") == "`MacheteLinearKernel`"  # unknown: its name, nothing more


def test_checkpoint_size_matches_torch(tmp_path):
    from safetensors.torch import save_file

    tensors = [{"w": torch.zeros(7, 3, dtype=torch.bfloat16)},
               {"s": torch.zeros(2, 5), "q": torch.zeros(4, dtype=torch.int8)}]
    for i, t in enumerate(tensors):
        save_file(t, tmp_path / f"model-{i}.safetensors", metadata={"format": "pt"})
    flat = [x for t in tensors for x in t.values()]
    assert common.checkpoint_size(tmp_path) == {"tensor_elements": sum(x.numel() for x in flat),
                                                "weight_bytes": sum(x.numel() * x.element_size() for x in flat)}
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        common.checkpoint_size(tmp_path / "missing")


def test_results_files_and_tables(tmp_path):
    path = common.write_json(tmp_path / "sub" / "r.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert common.read_json(path) == {"a": [1, 2]} and common.read_json(tmp_path / "none.json") is None
    assert common.markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"
    assert common.markdown_table(["a", "b"], [], align=["---", "---:"]) == "| a | b |\n|---|---:|"
    assert common.now()[:4].isdigit() and common.now()[10] == "T"
