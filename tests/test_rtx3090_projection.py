"""The RTX 3090 serving projection (benchmarks/rtx3090*.py): runs everywhere, and its numbers keep the
relations they must (pure arithmetic on config snapshots: no torch, no vLLM, well under a second)."""

import json
import math

import pytest

from benchmarks import rtx3090 as r
from benchmarks import rtx3090_model as m
from benchmarks import rtx3090_report as rep
from tlq_vllm.calibrate.planner import GiB, load_config, model_dims, snapshot_names


@pytest.fixture(scope="module")
def assumptions():
    return m.ServingAssumptions.from_presets()


@pytest.fixture(scope="module")
def projection(assumptions, tmp_path_factory):
    # an absent measurement file: the projection must not pick up one written elsewhere
    return r.run(assumptions, measured=tmp_path_factory.mktemp("m") / "none.json")


def dims(name):
    return model_dims(load_config(name)[0], name)


def test_projection_covers_every_snapshot_scheme_and_card_count(projection):
    assert projection["kind"] == "PROJECTION" and projection["measured"] is False
    assert set(projection["models"]) == set(r.dense_snapshot_names())
    assert {"qwen3-vl-30b-a3b", "qwen3-vl-235b-a22b"} <= set(snapshot_names()) - set(projection["models"])
    for model in projection["models"].values():
        assert set(model["schemes"]) == {"BF16", "W8A8", "W4A16", "W4A8", "W3A16"}
        for entry in model["schemes"].values():
            assert set(entry["tp"]) == {"1", "2", "4"}
            for row in entry["tp"].values():
                fit = row["fit"]
                assert fit["kv_cache_tokens"] % 16 == 0 and fit["kv_cache_tokens"] >= 0
                if fit["servable"]:
                    assert row["decode"] and row["prefill"]
                    for step in row["decode"]:
                        assert 0 < step["tok_s_per_seq"] < math.inf
                        assert step["tok_s_aggregate"] == pytest.approx(step["batch"] * step["tok_s_per_seq"])
                    assert row["decode"][-1]["batch"] <= fit["max_concurrent_seqs"] or fit["max_concurrent_seqs"] == 0
                    assert row["prefill"]["prefill_tok_s"] > 0 and row["prefill"]["ttft_ms"] > 0


@pytest.mark.parametrize("name", r.dense_snapshot_names())
def test_w4a16_weights_are_a_quarter_of_bf16_plus_group_scales(name):
    d = dims(name)
    bf16, w4 = m.weight_bytes(d, m.SCHEMES["BF16"]), m.weight_bytes(d, m.SCHEMES["W4A16"])
    # decoder linears: 4 bits + one bf16 scale per 128 weights = 1/4 + 1/128 of bf16, to 0.1% (all
    # these models have input features that are multiples of 128)
    assert w4["decoder_linears"] / bf16["decoder_linears"] == pytest.approx(0.25 + 1 / 128, rel=1e-3)
    # everything else (vision tower, embeddings, lm_head, biases, norms) stays bf16
    for part in ("decoder_other", "embeddings", "lm_head", "final_norm", "vision"):
        assert w4[part] == bf16[part]
    saved = bf16["decoder_linears"] - w4["decoder_linears"]
    assert w4["total"] == bf16["total"] - saved
    # whole model: 0.29 (72B) to 0.70 (the 0.5B, whose bf16 SigLIP tower is 45% of its parameters) of bf16
    assert 0.25 + 1 / 128 < w4["total"] / bf16["total"] < 0.72


def test_bytes_per_weight_of_each_scheme():
    s = m.SCHEMES
    assert s["BF16"].bytes_per_weight == 2
    assert s["W4A16"].bytes_per_weight == pytest.approx(0.5 + 2 / 128)
    assert s["W3A16"].bytes_per_weight == pytest.approx(3 / 8 * 32 / 30 + 2 / 128)  # 10 values per int32
    assert m.linear_bytes(4, 20, s["W3A16"]) == 4 * 2 * 4 + 4 * 1 * 2  # 2 words and 1 group per row
    assert m.linear_bytes(4, 256, s["W8A8"]) == 4 * 256 + 4 * 4  # int8 + one float32 scale per row
    assert {n: x.compute for n, x in s.items()} == {"BF16": "fp16", "W8A8": "int8", "W4A16": "fp16",
                                                     "W4A8": "int8", "W3A16": "fp16"}


def test_7b_bf16_fits_one_card(projection):
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b", "llava-onevision-7b"):
        entry = projection["models"][name]["schemes"]["BF16"]
        assert 14.5 < entry["weights_gib"]["total"] < 16  # 8.0-8.3 B parameters x 2 bytes = 16.1-16.6 GB
        fit = entry["tp"]["1"]["fit"]
        assert fit["status"] == "yes" and fit["kv_cache_tokens"] > 8192
    fit = projection["models"]["qwen2-vl-7b"]["schemes"]["BF16"]["tp"]["1"]["fit"]
    assert fit["kv_bytes_per_token_per_card"] == 2 * 28 * 4 * 128 * 2  # 56 KiB a token


def test_72b_bf16_does_not_fit_four_cards_but_w4a16_does_in_memory(projection):
    for name in ("qwen2-vl-72b", "qwen2.5-vl-72b", "llava-onevision-72b"):
        schemes = projection["models"][name]["schemes"]
        assert schemes["BF16"]["weights_gib"]["total"] > 4 * 24  # ~137 GiB
        assert not schemes["BF16"]["tp"]["4"]["fit"]["fits_memory"]
        w4 = schemes["W4A16"]["tp"]["4"]["fit"]
        assert w4["fits_memory"] and w4["weights_per_card_gib"] < 11
        assert not schemes["W4A16"]["tp"]["1"]["fit"]["fits_memory"]
        # ... but 29568 / 4 = 7392 input features of down_proj per rank straddle the 128-groups: vLLM's
        # group-quantized kernels refuse the split unless the MLP is zero-padded to 29696
        assert not w4["servable"] and any("7392" in p for p in w4["tp_problems"])
        assert w4["padding_hint"] == "pad intermediate_size 29568 -> 29696"
        assert schemes["W8A8"]["tp"]["4"]["fit"]["servable"]  # per-channel scales split anywhere


def test_tensor_parallel_rules():
    d05, d7 = dims("llava-onevision-0.5b"), dims("qwen2-vl-7b")
    assert any("14 attention heads" in p for p in m.tp_problems(d05, m.SCHEMES["BF16"], 4))
    assert m.tp_problems(d7, m.SCHEMES["W4A16"], 4) == []
    assert any("10-value" in p for p in m.tp_problems(d7, m.SCHEMES["W3A16"], 2))
    d2 = dims("qwen2-vl-2b")  # 2 KV heads on 4 cards: each card keeps one, replicated
    assert m.kv_bytes_per_token(d2, 4) == m.kv_bytes_per_token(d2, 2) == m.kv_bytes_per_token(d2, 1) // 2


@pytest.mark.parametrize("name", rep.HEADLINE_MODELS)
def test_w4a16_decodes_faster_than_bf16_at_batch_one(projection, name):
    schemes = projection["models"][name]["schemes"]
    for tp in ("1", "2"):
        bf16, w4 = schemes["BF16"]["tp"][tp]["decode"][0], schemes["W4A16"]["tp"][tp]["decode"][0]
        assert bf16["batch"] == w4["batch"] == 1 and bf16["linears_bound"] == "memory"
        assert w4["tok_s_per_seq"] > bf16["tok_s_per_seq"]
    # W4A16 prefill runs on the same FP16 tensor path as BF16; the INT8 path is faster
    p1 = {s: schemes[s]["tp"]["1"]["prefill"]["prefill_tok_s"] for s in schemes}
    assert p1["W4A16"] == pytest.approx(p1["BF16"], rel=0.05) and p1["W8A8"] > 1.5 * p1["BF16"]


def test_kv_capacity_grows_with_cards(projection):
    for model in projection["models"].values():
        for entry in model["schemes"].values():
            tokens = [entry["tp"][n]["fit"]["kv_cache_tokens"] for n in ("1", "2", "4")]
            assert tokens[0] <= tokens[1] <= tokens[2]
            if tokens[0] > 0:
                assert tokens[0] < tokens[1] < tokens[2]


def test_reserve_and_budget(assumptions):
    assert assumptions.gpu_memory_utilization == pytest.approx(0.92)  # the serve presets
    fit = m.memory_fit(dims("qwen2-vl-2b"), m.SCHEMES["BF16"], 1, assumptions)
    total = fit["weights_per_card_gib"] + fit["reserve_per_card_gib"] + fit["kv_cache_per_card_gib"]
    assert total == pytest.approx(0.92 * m.RTX3090.memory_bytes / GiB)
    assert m.memory_fit(dims("qwen2-vl-2b"), m.SCHEMES["BF16"], 2, assumptions)["reserve_per_card_gib"] > \
        fit["reserve_per_card_gib"]  # NCCL buffers


def test_main_writes_labelled_files_and_ratios(tmp_path, monkeypatch):
    assert r.main(["--out-dir", str(tmp_path), "--models", "qwen2-vl-2b", "llava-onevision-0.5b"]) == 0
    md = (tmp_path / "RTX3090.md").read_text()
    assert md.startswith("# RTX 3090 serving: PROJECTION (not a measurement)")
    assert "## Assumptions" in md and rep.NO_MEASUREMENT in md
    data = json.loads((tmp_path / "rtx3090_projection.json").read_text())
    assert data["kind"] == "PROJECTION" and set(data["models"]) == {"qwen2-vl-2b", "llava-onevision-0.5b"}

    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps([{"model": "qwen2-vl-2b", "scheme": "W4A16", "cards": 1,
                                     "metric": "decode_tok_s_b1", "value": 260.0, "machine": "1x RTX 3090"}]))
    p = r.run(m.ServingAssumptions.from_presets(), ["qwen2-vl-2b"], measured=measured)
    (ratio,) = p["measured_vs_projected"]
    projected = p["models"]["qwen2-vl-2b"]["schemes"]["W4A16"]["tp"]["1"]["decode"][0]["tok_s_per_seq"]
    assert ratio["ratio"] == pytest.approx(260.0 / projected)
    assert "decode_tok_s_b1 0." in rep.render_markdown(p) or "decode_tok_s_b1 1." in rep.render_markdown(p)
