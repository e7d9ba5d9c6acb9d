"""The accuracy benchmark: % of FP accuracy that each method keeps, per scheme, over seeds.

    python -m benchmarks.accuracy                 # the full matrix (make bench-accuracy)
    python -m benchmarks.accuracy --quick         # CI's reduced run: 1 seed, 64 questions, W4A16
    python -m benchmarks.accuracy --data scenes   # the scene testbed (toy VLM v2, docs/testbed.md)

`--data scenes` evaluates toy VLM v2 (`--model testbed`) on the 3,500 scene test questions and
the teacher-forced captions of 500 test scenes (NLL per token, KL against FP), calibrates on
`scenes:calibration`, reports accuracy per question type, and gives every difference (each method
against FP, and each pair of methods in a scheme) a paired 95% bootstrap interval over the
evaluation images (`benchmarks.common.paired_difference_ci`). Nothing is tuned on the test
split: the methods run at their defaults (a knob would be chosen on `scenes:validation`).

For the toy VLM (`tlq_vllm/assets/toyvlm-easyvqa`, trained on easy-vqa's train split) or any
`--model`: FP, then methods {rtn, gptq, mbq, smoothquant (A8 schemes), tlq} x schemes x seeds,
each calibrated on easy-vqa *train* samples (the seed picks them) and evaluated on a fixed subset
of the *test* split with the transformers backend (`tlq_vllm.eval`: exact checkpoint numerics,
int8 per-token activations for A8 schemes); TLQ ablations; and the llm-compressor GPTQ and AWQ
peers when their venv exists (`make peer-llmcompressor-setup`). Writes `accuracy.json`, `ACCURACY.md`
and PNG plots to --results-dir. RTN uses no data, so it runs once (its std is 0 by construction).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import common
from tlq_vllm.calibrate.methods import METHOD_NAMES, TOKEN, get_method
from tlq_vllm.paths import TESTBED_DIR

REPO = Path(__file__).resolve().parent.parent
TOYVLM = REPO / "tlq_vllm" / "assets" / "toyvlm-easyvqa"
PEER_PYTHON = REPO / ".venv-llmc" / "bin" / "python"
PEER_SCRIPT = REPO / "benchmarks" / "peers" / "llmcompressor_peer.py"
A8_SCHEMES = ("W8A8", "W4A8")


@dataclass(frozen=True)
class Dataset:
    """What the benchmark evaluates on and calibrates from, per `--data`."""

    model: Path  # the default --model: the toy VLM trained on this data
    eval_data: str  # `tlq_vllm.eval.load_items` name (a test split)
    calibration_data: str  # `tlq_vllm.calibrate.data.load_records` name (a split disjoint from the test)
    default_limit: int | None  # test questions when --eval-limit is not given (None: all)
    caption_scenes: int = 0  # teacher-forced captions of this many evaluation scenes (scenes only)
    split: str = "test"  # the split eval_data and the captions come from

# `scenes-validation` is where knobs are chosen (e.g. `--ablations shaping`): the same protocol on the
# validation scenes, so the test split is only ever used to report.
DATASETS = {
    "easy-vqa": Dataset(TOYVLM, "easy-vqa", "easy-vqa", 1000),
    "scenes": Dataset(TESTBED_DIR, "scenes", "scenes:calibration", None, caption_scenes=500),
    "scenes-validation": Dataset(TESTBED_DIR, "scenes:validation", "scenes:calibration", None, caption_scenes=500,
                                 split="validation"),
}


@dataclass(frozen=True)
class Variant:
    """One row of the matrix: a calibrator method with option overrides (an ablation), or the peer."""

    label: str
    method: str
    options: dict = field(default_factory=dict)
    peer: str = ""  # an llm-compressor algorithm (benchmarks/peers/llmcompressor_peer.py --algorithm)

    def applies_to(self, scheme: str) -> bool:
        """SmoothQuant migrates activation outliers into weights: only useful when activations are quantized."""
        return get_method(self.method).smoothquant_alpha is None or scheme in A8_SCHEMES

    @property
    def token_level(self) -> bool:
        """The plain token-importance method (TLQ), whose importance statistics the report plots."""
        return not self.peer and not self.options and get_method(self.method).token_weights == TOKEN

    @property
    def deterministic(self) -> bool:
        """No samples, so no seed changes its checkpoint: one run is enough."""
        return not self.peer and not get_method(self.method).needs_data(self.options.get("smoothquant_alpha"))


METHOD_VARIANTS = {name: Variant(name, name) for name in METHOD_NAMES}
ABLATIONS = [
    Variant("tlq: no exposure", "tlq", {"exposure": False}),
    Variant("tlq: no token selection (rho=1)", "tlq", {"rho": 1.0}),
    Variant("tlq: modality-level weights", "tlq", {"modality_level": True}),
    Variant("tlq: beta=0", "tlq", {"beta": 0.0}),
    Variant("tlq: beta=1", "tlq", {"beta": 1.0}),
]
# The opt-in token-weight shaping of docs/method.md 4a, each against the default tlq row (issue 15):
# to be chosen on scenes-validation, never on the test split.
SHAPING = [
    Variant("tlq: importance-power 0.5", "tlq", {"importance_power": 0.5}),
    Variant("tlq: importance-power 0.25", "tlq", {"importance_power": 0.25}),
    Variant("tlq: importance-power 0 (equal weights)", "tlq", {"importance_power": 0.0}),
    Variant("tlq: weight-shrinkage 0.5", "tlq", {"weight_shrinkage": 0.5}),
    Variant("tlq: per-sample weights", "tlq", {"per_sample_weights": True}),
]
ABLATION_SETS = {"components": ABLATIONS, "shaping": SHAPING}
PEERS = [Variant("llm-compressor gptq", "gptq", peer="gptq"), Variant("llm-compressor awq", "gptq", peer="awq")]


def summarize(accuracies: list[float], fp_accuracy: float) -> dict:
    """Mean, sample standard deviation (0 for one run) and % of FP accuracy retained."""
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return {"mean": mean, "std": std, "retained_pct": 100 * mean / fp_accuracy if fp_accuracy else float("nan"),
            "runs": len(accuracies)}


def calibrate(model: str, variant: Variant, scheme: str, seed: int, num_samples: int, out: Path,
              data: str = "easy-vqa") -> Path:
    from tlq_vllm.calibrate import CalibrationConfig, run

    config = CalibrationConfig(model=model, data=data, scheme=scheme, method=variant.method, seed=seed,
                               num_samples=num_samples, output=str(out), overwrite=True, progress=False,
                               **variant.options)
    return run(config.validate())


def calibrate_peer(model: str, scheme: str, seed: int, num_samples: int, out: Path, data: str = "easy-vqa",
                   algorithm: str = "gptq") -> Path:
    """llm-compressor's GPTQ or AWQ in its own venv, on exactly the records the calibrator would use."""
    from tlq_vllm.calibrate.data import load_records

    calib = out.with_suffix(".calib.jsonl")
    records = load_records(data, num_samples=num_samples, seed=seed)
    calib.write_text("".join(json.dumps({"image": str(r.images[0]), "question": r.prompt, "answer": r.answer}) + "\n"
                             for r in records))
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--model", model, "--calib-jsonl", str(calib),
           "--scheme", scheme, "--output", str(out), "--seed", str(seed), "--algorithm", algorithm, "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor {algorithm} failed ({scheme}, seed {seed}): "
                           f"{done.stderr.strip()[-2000:]}")
    return out


def tlq_importance(checkpoint: Path) -> list[dict] | None:
    provenance = checkpoint / "tlq_provenance.json"
    if not provenance.is_file():
        return None
    return json.loads(provenance.read_text()).get("importance", {}).get("per_layer_raw")


def machine() -> dict:
    """The machine as accuracy.json records it (benchmarks.common's facts)."""
    facts = common.cpu_facts()
    return {"cpu": facts["cpu_model"], "isa_flags": facts["isa_flags"], "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version()}


def plan(args) -> list[tuple[Variant, str, int]]:
    """(variant, scheme, seed) for every calibration of the run, in execution order."""
    runs = []
    for scheme in args.schemes:
        for name in args.methods:
            variant = METHOD_VARIANTS[name]
            if variant.applies_to(scheme):
                runs += [(variant, scheme, s) for s in (args.seeds[:1] if variant.deterministic else args.seeds)]
        if args.peer and scheme in args.peer_schemes:
            runs += [(peer, scheme, s) for peer in PEERS for s in args.seeds]
    if args.ablation_scheme:
        runs += [(v, args.ablation_scheme, s) for v in ABLATION_SETS[args.ablations] for s in args.seeds]
    return runs


def encode_eval_set(model: str, limit: int | None, dataset: Dataset = DATASETS["easy-vqa"]):
    """(evaluation items, their encoded batches, encoded caption batches or None)."""
    from transformers import AutoProcessor

    from tlq_vllm.eval import hf, load_items
    from tlq_vllm.eval.captions import caption_items

    items = load_items(dataset.eval_data, limit=limit, seed=0)
    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "left"
    captions = (hf.encode(processor, caption_items(dataset.split, dataset.caption_scenes), progress=False)
                if dataset.caption_scenes else None)
    return items, hf.encode(processor, items, progress=False), captions


def caption_metrics(checkpoint, captions, reference: list[torch.Tensor] | None) -> tuple[dict, list[torch.Tensor]]:
    """Teacher-forced caption NLL per token (and KL / top-1 agreement against FP's log-probs)."""
    from tlq_vllm.eval import hf
    from tlq_vllm.eval.captions import caption_nll

    model, _ = hf.load_model(checkpoint)
    log_probs = hf.answer_log_probs(model, captions)
    metrics = caption_nll(log_probs, [ids for b in captions for ids in b.answer_ids])
    if reference is not None:
        metrics.update({f"caption_{k}": v for k, v in hf.agreement_and_kl(reference, log_probs).items()})
    return metrics, log_probs


def correct_string(items, predictions: list[str]) -> str:
    """Per-question exact match as a string of 0/1, in item order: what paired intervals need,
    compact enough for accuracy.json."""
    from tlq_vllm.eval.vqa import vqa_score

    return "".join("1" if vqa_score(p, it.answers) >= 1 else "0" for p, it in zip(predictions, items, strict=True))


MATRIX_FILE = "matrix.json"  # in --work-dir: the matrix_identity of the run that wrote its records


def matrix_identity(args) -> dict:
    """What a finished run's records depend on besides its (variant, scheme, seed): --resume reuses
    records only from a work dir written with the same values."""
    return {"model": str(args.model), "data": args.data, "eval_limit": args.eval_limit,
            "num_samples": args.num_samples}


def finished_records(work: Path) -> list[dict]:
    """Every record the workers have written to `work` so far (one JSON line each, as they finish)."""
    return [json.loads(line) for path in sorted(work.glob("records-*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def latest_records(records: list[dict]) -> dict[tuple[str, str, int], dict]:
    """One record per (variant, scheme, seed): a run that failed and was redone by --resume keeps
    its success, whichever worker's file holds which."""
    latest = {}
    for r in sorted(records, key=lambda r: "error" not in r):  # failures first, so a success overwrites them
        latest[(r["variant"], r["scheme"], r["seed"])] = r
    return latest


def pending_runs(args) -> list[tuple[Variant, str, int]]:
    """The plan's runs whose record is not yet in the work dir (`todo.json`, written by run_matrix)."""
    by_label = {v.label: v for v, _, _ in plan(args)}
    return [(by_label[label], scheme, seed)
            for label, scheme, seed in json.loads((Path(args.work_dir) / "todo.json").read_text())]


def run_matrix(args) -> dict:
    """FP evaluation here, then the plan's calibrations split round-robin over `--jobs` worker
    processes (one thread each: on a few cores, small models run faster side by side than threaded).
    Workers write each record as it finishes; `--resume` runs only what an interrupted run left."""
    from tlq_vllm.eval.__main__ import evaluate_hf

    model = str(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    identity_file = work / MATRIX_FILE
    if not args.resume:
        for stale in work.glob("records-*.jsonl"):
            stale.unlink()
    identity_file.write_text(json.dumps(matrix_identity(args)) + "\n")
    done = {(r["variant"], r["scheme"], r["seed"]) for r in finished_records(work) if "error" not in r}
    todo = [(v.label, scheme, seed) for v, scheme, seed in plan(args) if (v.label, scheme, seed) not in done]
    (work / "todo.json").write_text(json.dumps(todo) + "\n")
    if args.resume:
        print(f"--resume: {len(done)} run(s) already recorded in {work}, {len(todo)} to go", flush=True)
    items, encoded, captions = encode_eval_set(model, args.eval_limit, args.dataset)
    print(f"accuracy benchmark: {model}; {len(items)} {args.data} {args.dataset.split} questions"
          + (f" and {args.dataset.caption_scenes} captions" if captions else "") + "; calibration: "
          f"{args.num_samples} {args.dataset.calibration_data} samples per run; {args.jobs} worker(s)", flush=True)
    fp, fp_predictions, fp_log_probs = evaluate_hf(model, encoded, progress=False)
    fp["correct"] = correct_string(items, fp_predictions)
    torch.save(fp_log_probs, work / "fp_log_probs.pt")
    if captions:
        caption_fp, caption_log_probs = caption_metrics(model, captions, None)
        fp.update(caption_fp)
        torch.save(caption_log_probs, work / "fp_caption_log_probs.pt")
    print(f"FP: accuracy {fp['accuracy']:.4f} ({fp['seconds']} s)"
          + (f", caption NLL {fp['caption_nll']:.4f}" if captions else ""), flush=True)
    del encoded, captions
    workers = []
    for i in range(args.jobs):
        cmd = [sys.executable, "-m", "benchmarks.accuracy", *args.argv, "--worker", f"{i}/{args.jobs}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None
        workers.append(subprocess.Popen(cmd, cwd=REPO, env=env))
    try:
        codes = [w.wait() for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
    if any(codes):
        raise RuntimeError(f"accuracy workers exited with {codes}")
    order = {key: n for n, key in enumerate((v.label, sc, s) for v, sc, s in plan(args))}
    runs = sorted((r for key, r in latest_records(finished_records(work)).items() if key in order),
                  key=lambda r: order[(r["variant"], r["scheme"], r["seed"])])
    importance = next((r.pop("importance") for r in runs if r.get("importance")), None)
    for r in runs:
        r.pop("importance", None)
    results = {"model": model, "machine": machine(),
               "eval": {"data": f"{args.dataset.eval_data.partition(':')[0]} {args.dataset.split}",
                        "questions": len(items), "subset_seed": 0,
                        "types": sorted({it.type for it in items if it.type}),
                        "clusters": [str(it.image) for it in items]},
               "calibration_data": args.dataset.calibration_data, "calibration_samples": args.num_samples,
               "seeds": args.seeds, "fp": fp, "jobs": args.jobs, "runs": runs, "importance": importance}
    results["summary"] = aggregate(results)
    results["differences"] = differences(results)
    if args.served:
        results["served"] = served_check(args, items, fp_predictions)
    return results


def served_check(args, items, fp_predictions: list[str]) -> list[dict]:
    """The served kernels: FP ("BF16") and TLQ seed-0 checkpoints of `--served` schemes behind
    `python -m tlq_vllm.serve` (vLLM, CPU preset), asked the same questions through the OpenAI API,
    against the transformers backend's answers for the same checkpoint."""
    from tlq_vllm.eval import endpoint
    from tlq_vllm.eval.__main__ import evaluate_hf, score
    from tlq_vllm.serve.process import ServerProcess

    work = Path(args.work_dir)
    _, encoded, _ = encode_eval_set(str(args.model), args.eval_limit, args.dataset)
    rows = []
    for scheme in args.served:
        if scheme == "BF16":
            checkpoint, hf_predictions = Path(args.model), fp_predictions
        else:
            checkpoint = calibrate(str(args.model), METHOD_VARIANTS["tlq"], scheme, args.seeds[0], args.num_samples,
                                   work / f"served-tlq-{scheme}", args.dataset.calibration_data)
            _, hf_predictions, _ = evaluate_hf(checkpoint, encoded, progress=False)
        t0 = time.time()
        try:
            with ServerProcess(checkpoint, log=work / f"served-{scheme}.log",
                               vllm_args=["--enforce-eager", "--max-model-len", "1024"]) as url:
                served = endpoint.predict(f"{url}/v1", items, concurrency=8, progress=False)
        except RuntimeError as err:
            print(f"served {scheme}: FAILED: {err}", flush=True)
            rows.append({"scheme": scheme, "error": str(err)})
            continue
        agree = sum(a == b for a, b in zip(served, hf_predictions, strict=True)) / len(items)
        row = {"scheme": scheme, "method": "fp" if scheme == "BF16" else "tlq", "served_accuracy":
               score(items, served)["accuracy"], "hf_accuracy": score(items, hf_predictions)["accuracy"],
               "answer_agreement_served_vs_hf": agree, "questions": len(items), "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"served {scheme}: accuracy {row['served_accuracy']:.4f} (transformers {row['hf_accuracy']:.4f}), "
              f"answers agree {agree:.4f} ({row['seconds']} s)", flush=True)
    return rows


def run_worker(args) -> None:
    """Calibrates and evaluates this worker's share of the pending runs; appends each record to
    records-<i>.jsonl as it finishes, so an interrupted matrix keeps what it measured."""
    from tlq_vllm.eval.__main__ import evaluate_hf

    index, count = (int(x) for x in args.worker.split("/"))
    model, work = str(args.model), Path(args.work_dir)
    items, encoded, captions = encode_eval_set(model, args.eval_limit, args.dataset)
    fp_log_probs = torch.load(work / "fp_log_probs.pt")
    fp_caption_log_probs = torch.load(work / "fp_caption_log_probs.pt") if captions else None
    data = args.dataset.calibration_data
    pending = pending_runs(args)
    runs = list(enumerate(pending, start=1))[index::count]
    total = len(pending)
    records = work / f"records-{index}.jsonl"

    def record(entry: dict) -> None:
        with records.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    for n, (variant, scheme, seed) in runs:
        name = variant.label.replace(" ", "_").replace(":", "").replace("=", "").replace("(", "").replace(")", "")
        out = work / f"{name}-{scheme}-s{seed}"
        t0 = time.time()
        try:
            if variant.peer:
                checkpoint = calibrate_peer(model, scheme, seed, args.num_samples, out, data, variant.peer)
            else:
                checkpoint = calibrate(model, variant, scheme, seed, args.num_samples, out, data)
        except Exception as err:  # a method that cannot do a scheme is a result, not a crash of the matrix
            print(f"[{n}/{total}] {variant.label} {scheme} seed {seed}: FAILED: {err}", flush=True)
            record({"variant": variant.label, "scheme": scheme, "seed": seed, "error": str(err)})
            continue
        seconds = round(time.time() - t0, 1)
        metrics, predictions, _ = evaluate_hf(checkpoint, encoded, reference=fp_log_probs, progress=False)
        metrics["correct"] = correct_string(items, predictions)
        if captions:
            metrics.update(caption_metrics(checkpoint, captions, fp_caption_log_probs)[0])
        entry = {"variant": variant.label, "scheme": scheme, "seed": seed, "calibration_seconds": seconds, **metrics}
        if variant.token_level and scheme == args.schemes[0] and seed == args.seeds[0]:
            entry["importance"] = {"scheme": scheme, "seed": seed, "per_layer_raw": tlq_importance(checkpoint)}
        record(entry)
        print(f"[{n}/{total}] {variant.label:32s} {scheme} seed {seed}: accuracy {metrics['accuracy']:.4f}, "
              f"top-1 agreement {metrics['top1_agreement']:.4f}, KL {metrics['mean_kl']:.2e} "
              f"(calibration {seconds} s, eval {metrics['seconds']} s)", flush=True)
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)


def question_scores(runs: list[dict]) -> list[float] | None:
    """Per question, the share of these runs (a variant's seeds) that answered it exactly."""
    if not runs or any("correct" not in r for r in runs):
        return None
    return [sum(r["correct"][i] == "1" for r in runs) / len(runs) for i in range(len(runs[0]["correct"]))]


def aggregate(results: dict) -> list[dict]:
    """Per (variant, scheme): accuracy mean/std/% retained, per-type accuracy, mean agreement and KL,
    caption NLL/KL where measured, and the difference from FP with its paired bootstrap interval
    (seed-averaged per-question scores against FP's, resampling the evaluation images)."""
    fp_accuracy = results["fp"]["accuracy"]
    fp_scores = question_scores([results["fp"]])
    clusters = results["eval"].get("clusters")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results["runs"]:
        if "error" not in r:
            groups.setdefault((r["variant"], r["scheme"]), []).append(r)
    rows = []
    for (variant, scheme), runs in groups.items():
        row = {"variant": variant, "scheme": scheme,
               **summarize([r["accuracy"] for r in runs], fp_accuracy),
               "top1_agreement": statistics.fmean(r["top1_agreement"] for r in runs),
               "mean_kl": statistics.fmean(r["mean_kl"] for r in runs)}
        for key in [k for k in runs[0] if k.startswith("accuracy_") or k in ("caption_nll", "caption_mean_kl")]:
            row[key] = statistics.fmean(r[key] for r in runs)
        scores = question_scores(runs)
        if scores is not None and fp_scores is not None and clusters:
            row["vs_fp"] = common.paired_difference_ci(fp_scores, scores, clusters)
        rows.append(row)
    return rows


def differences(results: dict) -> list[dict]:
    """Every pair of (non-ablation) variants within a scheme, and every ablation against the default
    tlq row of its scheme: mean accuracy of b minus a on the same questions, seed-averaged per
    question, with its paired 95% bootstrap interval over images."""
    clusters = results["eval"].get("clusters")
    if not clusters:
        return []
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for r in results["runs"]:
        if "error" not in r:
            by_cell.setdefault((r["scheme"], r["variant"]), []).append(r)
    rows = []
    for scheme in dict.fromkeys(k[0] for k in by_cell):
        variants = [v for (s, v) in by_cell if s == scheme and not v.startswith("tlq:")]
        ablations = [v for (s, v) in by_cell if s == scheme and v.startswith("tlq:")]
        pairs = [(a, b) for i, a in enumerate(variants) for b in variants[i + 1 :]]
        pairs += [("tlq", b) for b in ablations if "tlq" in variants]
        scores = {v: question_scores(by_cell[(scheme, v)]) for v in variants + ablations}
        for a, b in pairs:
            if scores[a] is not None and scores[b] is not None:
                rows.append({"scheme": scheme, "a": a, "b": b,
                             **common.paired_difference_ci(scores[a], scores[b], clusters)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="easy-vqa", choices=sorted(DATASETS),
                        help="easy-vqa (the toy VLM), scenes (the testbed: toy VLM v2, test split) or "
                             "scenes-validation (the same on the validation split, for choosing knobs); "
                             "default easy-vqa")
    parser.add_argument("--model", help="FP model directory (default: the --data set's toy VLM)")
    parser.add_argument("--schemes", default="W4A16,W3A16,W4A8,W8A8")
    parser.add_argument("--methods", default="rtn,gptq,mbq,smoothquant,tlq")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration samples per run (default 32)")
    parser.add_argument("--eval-limit", type=int,
                        help="fixed subset of the test questions (0 = all; default: easy-vqa 1000 of 9,673, "
                             "scenes all 3,500)")
    parser.add_argument("--ablation-scheme", default="W4A16", help="scheme of the TLQ ablations ('' = none)")
    parser.add_argument("--ablations", default="components", choices=sorted(ABLATION_SETS),
                        help="components: exposure, token selection, modality level, beta (default); shaping: "
                             "the token-weight shaping knobs (choose them with --data scenes-validation)")
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                        help="llm-compressor GPTQ rows (default: when .venv-llmc exists)")
    parser.add_argument("--peer-schemes", default="W4A16,W8A8")
    parser.add_argument("--served", default="BF16,W4A16,W8A8",
                        help="also ask these (FP as BF16, TLQ seed 0) through tlq_vllm.serve ('' = none)")
    parser.add_argument("--served-only", action="store_true",
                        help="only run the served check and add it to --results-dir's accuracy.json")
    parser.add_argument("--results-dir", help="default benchmarks/results (easy-vqa), "
                        "benchmarks/results/accuracy-scenes (scenes)")
    parser.add_argument("--work-dir", help="default out/bench-accuracy[-scenes]")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records an interrupted run left in --work-dir and run only the rest")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: "i/n", this process's share of the plan
    parser.add_argument("--quick", action="store_true",
                        help="CI's reduced run: seed 0, 64 questions, W4A16, rtn+tlq, 8 samples, no ablations/peer")
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.dataset = DATASETS[args.data]
    args.model = args.model or str(args.dataset.model)
    suffix = "" if args.data == "easy-vqa" else f"-{args.data}"
    results_default = REPO / "benchmarks" / "results" / (f"accuracy{suffix}" if suffix else "")
    args.results_dir = args.results_dir or str(results_default)
    args.work_dir = args.work_dir or str(REPO / "out" / f"bench-accuracy{suffix}")
    if args.eval_limit is None:
        args.eval_limit = args.dataset.default_limit or 0
    if args.quick:
        args.schemes, args.methods, args.seeds, args.eval_limit = "W4A16", "rtn,tlq", "0", 64
        args.num_samples, args.ablation_scheme, args.peer, args.jobs, args.served = 8, "", False, 1, ""
        if args.dataset.caption_scenes:
            args.dataset = dataclasses.replace(args.dataset, caption_scenes=8)
    try:
        args.schemes = [s.strip().upper() for s in args.schemes.split(",") if s.strip()]
        args.served = [s.strip().upper() for s in args.served.split(",") if s.strip()]
        args.peer_schemes = [s.strip().upper() for s in args.peer_schemes.split(",") if s.strip()]
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        unknown = [m for m in args.methods if m not in METHOD_VARIANTS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_VARIANTS)}")
        if not (Path(args.model) / "config.json").is_file():
            raise ValueError(f"--model {args.model} is not a model directory (no config.json)")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.eval_limit = args.eval_limit or None
    if args.peer is None:
        args.peer = PEER_PYTHON.is_file()
    if args.peer and not PEER_PYTHON.is_file():
        print(f"error: --peer needs {PEER_PYTHON} (make peer-llmcompressor-setup)", file=sys.stderr)
        return 2
    if args.worker:
        run_worker(args)
        return 0
    if args.served_only:  # add the served check to the results already in --results-dir
        from tlq_vllm.eval.__main__ import evaluate_hf

        results = json.loads((Path(args.results_dir) / "accuracy.json").read_text())
        items, encoded, _ = encode_eval_set(str(args.model), args.eval_limit, args.dataset)
        _, fp_predictions, _ = evaluate_hf(str(args.model), encoded, progress=False)
        del encoded
        results["served"] = served_check(args, items, fp_predictions)
        results["served_command"] = "python -m benchmarks.accuracy " + " ".join(args.argv)
        from benchmarks.accuracy_report import write_report

        print(f"wrote {', '.join(str(p) for p in write_report(results, Path(args.results_dir)))}")
        return 0
    identity_file = Path(args.work_dir) / MATRIX_FILE
    if args.resume and identity_file.is_file() and json.loads(identity_file.read_text()) != matrix_identity(args):
        print(f"error: --resume: {args.work_dir} holds a run of {identity_file.read_text().strip()}, not of "
              f"{json.dumps(matrix_identity(args))}; drop --resume or pick another --work-dir", file=sys.stderr)
        return 2
    started = time.time()
    results = run_matrix(args)
    results["wall_s"] = round(time.time() - started, 1)
    results["command"] = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    from benchmarks.accuracy_report import write_report

    paths = write_report(results, Path(args.results_dir))
    print(f"wrote {', '.join(str(p) for p in paths)} in {results['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
