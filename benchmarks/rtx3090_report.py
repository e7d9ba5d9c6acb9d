"""RTX3090.md from a projection (benchmarks/rtx3090.py): the card, the assumptions, and the fit and
throughput tables, every page labelled a projection."""

from __future__ import annotations

from benchmarks.common import markdown_table
from benchmarks.rtx3090_model import CARD_COUNTS

NO_MEASUREMENT = "no measurement on the same model yet"
HEADLINE_MODELS = ("qwen2-vl-2b", "qwen2-vl-7b", "llava-onevision-0.5b", "llava-onevision-7b")


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _first_servable(entry: dict) -> tuple[str, dict] | None:
    for tp, row in entry["tp"].items():
        if row["decode"] and row["fit"]["servable"]:
            return tp, row
    for tp, row in entry["tp"].items():  # memory fits but a TP shard is refused: still show the roofline
        if row["decode"]:
            return tp, row
    return None


def _fits_cell(fit: dict) -> str:
    return {"yes": "yes", "no (memory)": "no"}.get(fit["status"], "mem ok, TP refused")


def _ratio_cell(ratios: list[dict], model: str, scheme: str) -> str:
    mine = [r for r in ratios if r["model"] == model and r["scheme"] == scheme]
    if not mine:
        return NO_MEASUREMENT
    return "; ".join(f"{r['metric']} {r['ratio']:.2f} ({r.get('machine', '?')})" for r in mine)


def headline_rows(p: dict, models=HEADLINE_MODELS) -> list[list]:
    rows = []
    for model in models:
        if model not in p["models"]:
            continue
        for scheme, entry in p["models"][model]["schemes"].items():
            fits = " / ".join(_fits_cell(entry["tp"][str(n)]["fit"]) for n in CARD_COUNTS if str(n) in entry["tp"])
            pick = _first_servable(entry)
            if pick is None:
                rows.append([model, scheme, _fmt(entry["weights_gib"]["total"], 2), fits, "-", "-", "-", "-", "-",
                             _ratio_cell(p["measured_vs_projected"], model, scheme)])
                continue
            tp, row = pick
            last = row["decode"][-1]
            rows.append([
                model, scheme, _fmt(entry["weights_gib"]["total"], 2), fits,
                tp if row["fit"]["servable"] else f"{tp} (TP refused)",
                _fmt(row["decode"][0]["tok_s_per_seq"]),
                f"{_fmt(last['tok_s_aggregate'])} (B={last['batch']})",
                _fmt(row["prefill"]["prefill_tok_s"]), _fmt(row["prefill"]["ttft_ms"]),
                _ratio_cell(p["measured_vs_projected"], model, scheme),
            ])
    return rows


HEADLINE_HEADER = ["model", "scheme", "weights GiB", "fits 1 / 2 / 4 cards", "cards used", "decode tok/s B=1",
                   "decode tok/s aggregate (max B)", "prefill tok/s", "TTFT ms", "measured/projected"]


def memory_rows(p: dict) -> list[list]:
    rows = []
    for model, m in p["models"].items():
        for scheme, entry in m["schemes"].items():
            for tp, row in entry["tp"].items():
                f = row["fit"]
                why = "; ".join(f["tp_problems"]) + (f" ({f['padding_hint']})" if f["padding_hint"] else "")
                rows.append([
                    model, scheme, tp, _fmt(f["weights_per_card_gib"], 2), _fmt(f["kv_cache_per_card_gib"], 2),
                    _fmt(f["kv_cache_tokens"]) + (" (KV heads replicated)" if f["kv_heads_replicated"] else ""),
                    f"{f['max_concurrent_seqs_kv']} / {f['max_concurrent_seqs']}",
                    "yes" if f["preset_max_model_len_fits"] else "no", f["status"] + (f": {why}" if why else ""),
                ])
    return rows


MEMORY_HEADER = ["model", "scheme", "cards", "weights/card GiB", "KV cache/card GiB", "KV tokens",
                 "max seqs @ctx (KV / preset cap)", "preset max-model-len fits", "fits"]


def throughput_rows(p: dict, models=HEADLINE_MODELS) -> list[list]:
    rows = []
    for model in models:
        if model not in p["models"]:
            continue
        for scheme, entry in p["models"][model]["schemes"].items():
            for tp, row in entry["tp"].items():
                if not row["decode"]:
                    continue
                by_b = {r["batch"]: r for r in row["decode"]}
                last = row["decode"][-1]
                cells = [_fmt(by_b[b]["tok_s_aggregate"]) if b in by_b else "-" for b in (1, 8, 32)]
                rows.append([
                    model, scheme, tp + ("" if row["fit"]["servable"] else " (refused)"), *cells,
                    f"{_fmt(last['tok_s_aggregate'])} (B={last['batch']})",
                    f"{by_b[min(by_b)]['linears_bound']} / {last['linears_bound']}",
                    _fmt(row["prefill"]["prefill_tok_s"]), _fmt(row["prefill"]["vision_ms"]),
                    _fmt(row["prefill"]["ttft_ms"]),
                ])
    return rows


def large_model_rows(p: dict) -> list[list]:
    rows = []
    for model, m in p["models"].items():
        if not model.endswith("72b"):
            continue
        for scheme, entry in m["schemes"].items():
            fits = " / ".join(_fits_cell(entry["tp"][str(n)]["fit"]) for n in CARD_COUNTS if str(n) in entry["tp"])
            f4 = entry["tp"].get("4", {}).get("fit")
            if f4 is None:
                continue
            if f4["servable"]:
                what = "4 cards"
            elif not f4["fits_memory"]:
                what = "more than 4 cards' memory"
            else:
                what = f4["padding_hint"] or "; ".join(f4["tp_problems"])
            rows.append([model, scheme, _fmt(entry["weights_gib"]["total"], 1), fits,
                         _fmt(f4["weights_per_card_gib"], 2), _fmt(f4["kv_cache_tokens"]),
                         f4["max_concurrent_seqs"], what])
    return rows


THROUGHPUT_HEADER = ["model", "scheme", "cards", "decode tok/s B=1", "B=8", "B=32", "max B",
                     "linears bound (B=1 / max)", "prefill tok/s", "vision ms", "TTFT ms"]


def render_markdown(p: dict) -> str:
    a, card = p["assumptions"], p["card"]
    lines = [
        "# RTX 3090 serving: PROJECTION (not a measurement)",
        "",
        f"Projected by `python -m benchmarks.rtx3090` on {p['date']} from the config.json snapshots in "
        "`tlq_vllm/models/config_snapshots/` (parameter counts from `tlq_vllm.calibrate.planner`) and the card's "
        "public specifications. **No number on this page was measured on an RTX 3090.** Equations: the docstring of "
        "`benchmarks/rtx3090_model.py`; every row with more detail: `benchmarks/results/rtx3090_projection.json`.",
        "",
        "## The card",
        "",
        markdown_table(["", ""], [
            ["card", f"{card['name']}: {card['arch']}"],
            ["memory", card["memory_nominal"]],
            ["bandwidth", f"{card['bandwidth'] / 1e9:.0f} GB/s (19.5 Gbps GDDR6X, 384-bit)"],
            ["FP16/BF16 tensor, FP32 accumulate (dense)", f"{card['fp16_tensor_flops'] / 1e12:.0f} TFLOPS "
             "(142 with FP16 accumulate; GeForce runs FP32-accumulate at half rate; 2:4 sparse figures unused)"],
            ["INT8 tensor (dense)", f"{card['int8_tensor_ops'] / 1e12:.0f} TOPS (568 sparse, unused)"],
            ["interconnect", card["interconnect"]],
            ["sources", "; ".join(card["sources"])],
        ]),
        "",
        "## Assumptions",
        "",
        *[f"- {line}" for line in a["list"]],
        "",
        "## Schemes as vLLM would serve them on sm86",
        "",
        markdown_table(["scheme", "bytes/weight (decoder linears)", "compute path", "vLLM kernel on sm86",
                "efficiency (bandwidth / compute)", "note"],
               [[s["name"], f"{s['bytes_per_weight']:.4f}",
                 "FP16 tensor cores (71 TFLOPS)" if s["compute"] == "fp16" else "INT8 tensor cores (284 TOPS)",
                 s["kernel"], f"{s['bandwidth_efficiency']} / {s['compute_efficiency']}", s["note"] or ""]
                for s in p["schemes"].values()]),
        "",
        "Bytes per weight: BF16 2; W8A8 1 + a float32 scale per output channel; W4A16/W4A8 0.5 + a bf16 scale per "
        "128 weights; W3A16 4 bytes per 10 weights (compressed-tensors packs 10 3-bit values per int32, 2 bits "
        "unused: 3/8 x 32/30 = 0.4) + a bf16 scale per 128. Vision tower, projector, embeddings and lm_head stay bf16.",
        "",
        f"## Headline: reference request of {a['context']} tokens with one ~{a['image_tokens']}-token image",
        "",
        "Throughput columns are on the fewest cards that fit (`cards used`); `mem ok, TP refused` means the weights "
        "fit but vLLM or the tlq plugin would refuse that tensor-parallel split (see the memory table).",
        "",
        markdown_table(HEADLINE_HEADER, headline_rows(p)),
        "",
        "## Memory fit on 1 / 2 / 4 cards (all snapshots)",
        "",
        f"`fits`: weights + reserve leave KV room for at least one {a['context']}-token sequence and vLLM accepts the "
        "split. `preset max-model-len fits`: the KV cache also holds one sequence of the serve preset's "
        f"max-model-len ({', '.join(f'{n} card(s): {v}' for n, v in a['max_model_len'].items())}), which vLLM "
        "checks at start-up (lower --max-model-len otherwise).",
        "",
        markdown_table(MEMORY_HEADER, memory_rows(p)),
        "",
        "## 72B models: fit only",
        "",
        markdown_table(["model", "scheme", "weights GiB", "fits 1 / 2 / 4 cards", "weights/card on 4", "KV tokens on 4",
                "max seqs @ctx on 4", "what it takes"], large_model_rows(p)),
        "",
        "## Roofline throughput by card count",
        "",
        "Aggregate decode tokens/s at batch B (every sequence at the reference context; `max B` = the KV-limited "
        "concurrency capped by the preset's max-num-seqs), which kernel bound the decoder linears, decoder prefill "
        "tokens/s and TTFT of the reference request (vision tower + decoder prefill).",
        "",
        markdown_table(THROUGHPUT_HEADER, throughput_rows(p)),
        "",
        "## Measured / projected ratio",
        "",
    ]
    if p["measured_vs_projected"]:
        header = ["model", "scheme", "cards", "metric", "measured", "projected", "ratio", "machine", "date"]
        lines.append(markdown_table(header, [
            [r["model"], r["scheme"], r["cards"], r["metric"], _fmt(float(r["value"]), 1), _fmt(r["projected"], 1),
             f"{r['ratio']:.2f}", r.get("machine", "?"), r.get("date", "?")] for r in p["measured_vs_projected"]]))
    else:
        lines.append(f"{NO_MEASUREMENT.capitalize()}: no RTX 3090 serving run of these models exists (this "
                     "project's machines are CPU-only, with an H100/H200 lent to some tasks without vLLM on it). A "
                     "serving run on RTX 3090s fills it by writing `benchmarks/results/rtx3090_measured.json` "
                     "(format: the module docstring).")
    return "\n".join(lines) + "\n"

