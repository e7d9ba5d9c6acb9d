"""Renders an accuracy benchmark result (benchmarks.accuracy) as accuracy.json, ACCURACY.md and plots."""

from __future__ import annotations

from pathlib import Path

from benchmarks import common

MAIN_ORDER = ["rtn", "gptq", "mbq", "smoothquant", "llm-compressor gptq", "llm-compressor awq", "tlq"]


def cell(row: dict | None) -> str:
    if row is None:
        return "—"
    return f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} ({row['retained_pct']:.1f}%)"


def main_table(results: dict) -> list[str]:
    summary = {(r["variant"], r["scheme"]): r for r in results["summary"]}
    schemes = list(dict.fromkeys(r["scheme"] for r in results["summary"] if r["variant"] in MAIN_ORDER))
    variants = [v for v in MAIN_ORDER if any(k[0] == v for k in summary)]
    fp = 100 * results["fp"]["accuracy"]
    lines = ["| method | " + " | ".join(schemes) + " |", "|---" * (len(schemes) + 1) + "|",
             "| FP (bf16 weights) | " + " | ".join(f"{fp:.2f} (100%)" for _ in schemes) + " |"]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(cell(summary.get((v, s))) for s in schemes) + " |")
    return lines


def points(ci: dict | None) -> str:
    """A difference in accuracy points with its 95% interval, e.g. "-1.3 [-2.1, -0.5]"."""
    if not ci:
        return "—"
    return f"{100 * ci['diff']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]"


def versus_fp_table(results: dict) -> list[str]:
    """Per (variant, scheme): the difference from FP with its interval, per-type accuracy, caption metrics."""
    rows = [r for r in results["summary"] if not r["variant"].startswith("tlq:")]
    types = results["eval"].get("types") or []
    captions = any("caption_nll" in r for r in rows)
    fp = results["fp"]
    headers = ["variant", "scheme", "runs", "vs FP, points [95%]", *types,
               *(["caption NLL", "caption KL"] if captions else [])]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|",
             "| FP | | 1 | | " + " | ".join(f"{100 * fp[f'accuracy_{t}']:.1f}" for t in types)
             + (f" | {fp['caption_nll']:.4f} | |" if captions else " |")]
    for r in sorted(rows, key=lambda r: (r["scheme"], r["variant"])):
        cells = [r["variant"], r["scheme"], str(r["runs"]), points(r.get("vs_fp")),
                 *(f"{100 * r[f'accuracy_{t}']:.1f}" if f"accuracy_{t}" in r else "—" for t in types)]
        if captions:
            cells += [f"{r['caption_nll']:.4f}" if "caption_nll" in r else "—",
                      f"{r['caption_mean_kl']:.2e}" if "caption_mean_kl" in r else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def differences_table(results: dict) -> list[str]:
    lines = ["| scheme | b | a | b − a, points [95%] | separated |", "|---|---|---|---|---|"]
    for d in results.get("differences") or []:
        separated = "yes" if d["low"] > 0 or d["high"] < 0 else "no"
        lines.append(f"| {d['scheme']} | {d['b']} | {d['a']} | {points(d)} | {separated} |")
    return lines


def detail_table(rows: list[dict]) -> list[str]:
    lines = ["| variant | scheme | runs | accuracy % (mean ± std) | % of FP | top-1 agreement | mean KL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['scheme']} | {r['runs']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} "
                     f"| {r['retained_pct']:.1f} | {r['top1_agreement']:.4f} | {r['mean_kl']:.2e} |")
    return lines


def calibration_label(data: str) -> str:
    """easy-vqa calibrates on its train split; other sets are named as `--data` names them."""
    return "easy-vqa *train*" if data == "easy-vqa" else f"`{data}`"


def write_markdown(results: dict, path: Path, plots: list[Path]) -> None:
    m = results["machine"]
    ablations = [r for r in results["summary"] if r["variant"].startswith("tlq:")]
    ablation_scheme = ablations[0]["scheme"] if ablations else None
    base = [r for r in results["summary"] if r["variant"] == "tlq" and r["scheme"] == ablation_scheme]
    failures = [r for r in results["runs"] if "error" in r]
    text = [
        "# Accuracy: % of FP accuracy retained",
        "",
        f"Model `{Path(results['model']).name}`; evaluation: {results['eval']['questions']} questions of the "
        f"{results['eval']['data']} split (fixed subset, seed {results['eval']['subset_seed']}), exact match after "
        f"normalisation, greedy answers, transformers backend (`tlq_vllm.eval`: dequantized checkpoint weights, "
        f"int8 per-token activations for A8 schemes, float32 compute). Calibration: "
        f"{results['calibration_samples']} {calibration_label(results.get('calibration_data', 'easy-vqa'))} "
        "samples per run (a split disjoint from the test questions), chosen by the seed "
        f"(seeds {', '.join(map(str, results['seeds']))}); RTN uses no data and runs once.",
        "",
        f"Produced by `{results['command'].strip()}` on {m['cpu']} {common.describe_isa(m.get('isa_flags'))} "
        f"({m['threads']} threads), {m['date']}, "
        f"torch {m['torch']}; {results['wall_s'] / 60:.1f} min. Raw numbers: `accuracy.json`.",
        "",
        f"FP accuracy: **{100 * results['fp']['accuracy']:.2f}%**.",
        "",
        "## Accuracy % (mean ± std over seeds) and % of FP retained",
        "",
        *main_table(results),
        "",
    ]
    if results.get("differences"):
        text += ["## Differences from FP, per question type" + (" and on captions" if "caption_nll" in results["fp"]
                                                                 else ""), "",
                 "Accuracy points against FP on the same questions (seed-averaged per question), with a paired "
                 "95% bootstrap interval that resamples the evaluation images (2,000 resamples); per type the "
                 "mean accuracy %; captions: teacher-forced NLL per token and KL(FP || quantized) on the "
                 "caption tokens of held-out scenes.", "", *versus_fp_table(results), "",
                 "## Method differences (paired, same questions)", "",
                 "Every pair of methods in a scheme: b's accuracy minus a's in points, with its paired 95% "
                 "bootstrap interval; *separated* when the interval excludes 0.", "", *differences_table(results), ""]
    if ablations:
        text += [f"## TLQ ablations ({ablations[0]['scheme']})", "", *detail_table(base + ablations), ""]
    text += ["## Agreement with the FP model on the answer tokens", "",
             "Top-1 agreement: the argmax token equals FP's at the reference answer's positions (teacher forced). "
             "Mean KL: KL(FP || quantized) over those positions.", "",
             *detail_table([r for r in results["summary"] if not r["variant"].startswith("tlq:")]), ""]
    served = results.get("served") or []
    if served:
        text += ["## Served through vLLM (`tlq_vllm.serve`, CPU preset) vs the transformers backend", "",
                 f"{served[0].get('questions', '')} of the evaluation questions asked through the OpenAI API of a "
                 "running server (greedy), for the FP model "
                 "and TLQ seed-0 checkpoints; the last column is the share of questions where the served answer "
                 "equals the transformers backend's answer for the same checkpoint."
                 + (f" Command: `{results['served_command']}`." if results.get("served_command") else ""), "",
                 "| checkpoint | served accuracy % | transformers accuracy % | answers agree % | seconds |",
                 "|---|---|---|---|---|"]
        for r in served:
            if "error" in r:
                text.append(f"| {r['scheme']} | failed: {r['error'][:200]} | | | |")
            else:
                name = "FP (BF16)" if r["scheme"] == "BF16" else f"tlq {r['scheme']}"
                text.append(f"| {name} | {100 * r['served_accuracy']:.2f} | {100 * r['hf_accuracy']:.2f} | "
                            f"{100 * r['answer_agreement_served_vs_hf']:.2f} | {r['seconds']} |")
        text.append("")
    if failures:
        text += ["## Runs that failed", ""] + [f"- {r['variant']} {r['scheme']} seed {r['seed']}: {r['error'][:300]}"
                                               for r in failures] + [""]
    text += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path.write_text("\n".join(text))


def plot_retained(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {(r["variant"], r["scheme"]): r for r in results["summary"]}
    schemes = list(dict.fromkeys(r["scheme"] for r in results["summary"] if r["variant"] in MAIN_ORDER))
    variants = [v for v in MAIN_ORDER if any(k[0] == v for k in summary)]
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(schemes)), 4))
    fp = results["fp"]["accuracy"]
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j, s in enumerate(schemes) if (v, s) in summary]
        rows = [summary[(v, s)] for s in schemes if (v, s) in summary]
        ax.bar(xs, [r["retained_pct"] for r in rows], width, yerr=[100 * r["std"] / fp for r in rows],
               label=v, capsize=2)
    ax.axhline(100, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(schemes)), schemes)
    ax.set_ylabel("% of FP accuracy retained")
    low = min((r["retained_pct"] for r in results["summary"]), default=90)
    ax.set_ylim(max(0, low - 5), 102)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title(f"{results['eval']['data']} accuracy retained (mean, ±1 std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_importance(results: dict, path: Path) -> Path | None:
    imp = results.get("importance") or {}
    layers = imp.get("per_layer_raw")
    if not layers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for role in ("vision", "prompt", "answer"):
        ax.plot(range(len(layers)), [layer[role] for layer in layers], marker="o", label=f"{role} tokens")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean gradient importance ||dL/dy||²")
    ax.set_title(f"TLQ token importance per layer ({imp['scheme']}, seed {imp['seed']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = common.write_json(out_dir / "accuracy.json", results)
    plots = [plot_retained(results, out_dir / "accuracy_retained.png")]
    importance = plot_importance(results, out_dir / "tlq_importance.png")
    plots += [importance] if importance else []
    md = out_dir / "ACCURACY.md"
    write_markdown(results, md, plots)
    return [json_path, md, *plots]
