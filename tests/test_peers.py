"""The llm-compressor peer (benchmarks/peers): argument and data handling in the main venv, and
an end-to-end run in .venv-llmc (marked slow, skipped when .venv-llmc is absent)."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.peers import llmcompressor_peer as peer

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_resolve_relative_and_absolute_images(tmp_path, sample_image):
    sample_image.save(tmp_path / "a.png")
    absolute = tmp_path / "sub" / "b.png"
    absolute.parent.mkdir()
    sample_image.save(absolute)
    calib = write_jsonl(
        tmp_path / "calib.jsonl",
        [{"image": "a.png", "question": "what shape?", "answer": "circle"},
         {"image": str(absolute), "question": "is it red?", "answer": ["no", "nope"]}],
    )
    records = peer.read_records(calib)
    assert [r["image"] for r in records] == [tmp_path / "a.png", absolute]
    assert [r["answer"] for r in records] == ["circle", "no"]


@pytest.mark.parametrize(
    "line, message",
    [("{not json", "not valid JSON"), ('{"question": "q"}', "needs 'image'"),
     ('{"image": "missing.png", "question": "q"}', "not found")],
)
def test_bad_records_are_named(tmp_path, line, message):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(line + "\n")
    with pytest.raises(peer.PeerError, match=message) as err:
        peer.read_records(calib)
    assert "calib.jsonl:1" in str(err.value)


def test_scheme_names_and_formats():
    args = peer.parse_args(["--model", "m", "--calib-jsonl", "c", "--scheme", "w4a16", "--output", "o"])
    assert args.scheme == "W4A16"
    with pytest.raises(SystemExit):
        peer.parse_args(["--model", "m", "--calib-jsonl", "c", "--scheme", "W8A16", "--output", "o"])
    # 3-bit packing differs between compressed-tensors 0.19 (dense) and 0.17 (10 per int32)
    assert peer.storage_format("W3A16", "auto") == "naive-quantized"
    assert peer.storage_format("W4A16", "auto") is None
    assert peer.storage_format("W3A16", "pack-quantized") == "pack-quantized"
    # W2A16 is tlq's group-64 grid, not compressed-tensors 0.19's group-128 preset of that name
    w2 = peer.make_scheme("W2A16").weights
    assert (w2.num_bits, w2.group_size, w2.symmetric) == (2, 64, True)
    assert args.algorithm == "gptq"
    awq = peer.parse_args(["--model", "m", "--calib-jsonl", "c", "--scheme", "W4A16", "--output", "o", "--algorithm",
                           "awq"])
    assert awq.algorithm == "awq"
    with pytest.raises(SystemExit):
        peer.parse_args(["--model", "m", "--calib-jsonl", "c", "--scheme", "W4A16", "--output", "o", "--algorithm",
                         "smoothquant"])


def test_awq_mappings_match_only_the_decoder_of_qwen2_vl():
    """Each AWQ pattern (re: prefix) matches its decoder module of every layer and nothing in the
    vision tower, whose blocks have their own norms and MLPs."""
    import re

    from transformers import AutoModelForImageTextToText

    from tlq_vllm.testing import build_fixture

    names = [n for n, _ in AutoModelForImageTextToText.from_pretrained(build_fixture("qwen2-vl")).named_modules()]
    decoder = [n for n in names if ".language_model.layers." in n and n.endswith(
        ("input_layernorm", "post_attention_layernorm", "_proj"))]
    vision = [n for n in names if ".visual." in n]
    assert len(decoder) == 9 * len({n.split(".layers.")[1].split(".")[0] for n in decoder}) and vision
    patterns = [p for smooth, balance in peer.AWQ_MAPPINGS for p in (smooth, *balance)]
    assert all(p.startswith("re:") for p in patterns)
    matched = {n for n in decoder + vision for p in patterns if re.match(p[3:], n)}
    assert matched == set(decoder)


def test_setup_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/peers/setup_llmcompressor.sh")], check=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not LLMC_PYTHON.exists(), reason=".venv-llmc absent (bash benchmarks/peers/setup_llmcompressor.sh)")
@pytest.mark.parametrize("scheme, algorithm",
                         [("W4A16", "gptq"), ("W3A16", "gptq"), ("W2A16", "gptq"), ("W4A16", "awq")])
def test_peer_checkpoint_loads_in_main_venv(tmp_path, scheme, algorithm):
    """llm-compressor (compressed-tensors 0.19) writes it; transformers 5.19 + compressed-tensors
    0.17 load it dequantized, the decoder weights lie on the grid, the vision tower is untouched."""
    import easy_vqa

    from benchmarks.peers.check_checkpoint import check
    from tlq_vllm.testing import build_fixture

    model = build_fixture("qwen2-vl")
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    calib = write_jsonl(
        tmp_path / "calib.jsonl",
        [{"image": paths[image_ids[i]], "question": questions[i], "answer": answers[i]} for i in range(4)],
    )
    out = tmp_path / "peer"
    run = subprocess.run(
        [str(LLMC_PYTHON), str(ROOT / "benchmarks/peers/llmcompressor_peer.py"), "--model", str(model),
         "--calib-jsonl", str(calib), "--scheme", scheme, "--output", str(out), "--algorithm", algorithm],
        capture_output=True, text=True, timeout=850,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directory left behind"
    summary = check(out, model)
    assert summary["bits"] == int(scheme[1]) and summary["decoder_linears_on_grid"] > 0
    assert summary["unquantized_tensors_equal_source"] > 0
    provenance = json.loads((out / "peer_provenance.json").read_text())
    assert provenance["num_samples"] == 4 and provenance["scheme"] == scheme
    assert provenance["algorithm"] == algorithm
