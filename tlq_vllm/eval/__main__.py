"""`python -m tlq_vllm.eval`: VQA accuracy of a checkpoint, served or through transformers.

    python -m tlq_vllm.eval --model out/toyvlm-tlq-w4a16 --limit 2000          # transformers
    python -m tlq_vllm.eval --endpoint http://127.0.0.1:8000/v1 --limit 2000     # a running server
    python -m tlq_vllm.eval --model M --data my_vqa.jsonl --reference fp_logprobs.pt

Prints accuracy (and, with --reference, top-1 agreement and mean KL vs the FP model on the answer
tokens) and writes them, with every prediction, to --output as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tlq_vllm.eval.vqa import VQAItem, load_items, vqa_score
from tlq_vllm.records import DataError


def score(items: list[VQAItem], predictions: list[str]) -> dict:
    """Accuracy over all items and, where items have a question type, `accuracy_<type>` per type."""
    scores = [vqa_score(p, it.answers) for p, it in zip(predictions, items, strict=True)]
    metrics = {"accuracy": sum(scores) / len(scores), "questions": len(items)}
    for t in dict.fromkeys(it.type for it in items if it.type):
        typed = [s for s, it in zip(scores, items, strict=True) if it.type == t]
        metrics[f"accuracy_{t}"] = sum(typed) / len(typed)
    return metrics


def evaluate_hf(model_dir, encoded, *, reference: list[torch.Tensor] | None = None, max_new_tokens: int = 8,
                progress: bool = True) -> tuple[dict, list[str], list[torch.Tensor]]:
    """Accuracy (and agreement/KL against `reference` log-probs) of a model directory through
    transformers on batches from `hf.encode`; returns (metrics, predictions, answer log-probs)."""
    from tlq_vllm.eval import hf

    t0 = time.time()
    model, processor = hf.load_model(model_dir)
    predictions, log_probs = hf.evaluate(model, processor, encoded, max_new_tokens=max_new_tokens, progress=progress)
    metrics = score([it for b in encoded for it in b.items], predictions)
    if reference is not None:
        metrics.update(hf.agreement_and_kl(reference, log_probs))
    metrics["seconds"] = round(time.time() - t0, 1)
    return metrics, predictions, log_probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlq_vllm.eval", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="model directory (FP or compressed-tensors), evaluated with transformers")
    target.add_argument("--endpoint", help="OpenAI-compatible base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--data", default="easy-vqa",
                        help="easy-vqa (test split), scenes (test split; scenes:validation) or a VQA JSONL "
                        "(default easy-vqa)")
    parser.add_argument("--limit", type=int, help="a fixed subset of this many questions (seeded; default all)")
    parser.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="parallel requests to --endpoint (default 8)")
    parser.add_argument("--reference", help="FP answer log-probs (.pt from --save-log-probs): adds agreement and KL")
    parser.add_argument("--save-log-probs", help="write this model's answer log-probs here (.pt; transformers only)")
    parser.add_argument("--output", help="results JSON (default: print only)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise DataError(f"--limit must be at least 1, got {args.limit}")
        if args.model and not (Path(args.model) / "config.json").is_file():
            raise DataError(f"--model {args.model} is not a model directory (no config.json)")
        if args.endpoint and (args.reference or args.save_log_probs):
            raise DataError("--reference/--save-log-probs need full distributions: use --model (transformers)")
        items = load_items(args.data, limit=args.limit, seed=args.seed)
        reference = torch.load(args.reference) if args.reference else None
        if args.model:
            from transformers import AutoProcessor

            from tlq_vllm.eval import hf

            processor = AutoProcessor.from_pretrained(args.model)
            processor.tokenizer.padding_side = "left"
            encoded = hf.encode(processor, items, batch_size=args.batch_size, progress=not args.no_progress)
            metrics, predictions, log_probs = evaluate_hf(
                args.model, encoded, reference=reference, progress=not args.no_progress
            )
            if args.save_log_probs:
                torch.save(log_probs, args.save_log_probs)
        else:
            from tlq_vllm.eval import endpoint

            t0 = time.time()
            predictions = endpoint.predict(args.endpoint, items, concurrency=args.concurrency,
                                           progress=not args.no_progress)
            metrics = {**score(items, predictions), "seconds": round(time.time() - t0, 1)}
    except (DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the server went away, refused the request, ...
        if type(err).__module__.startswith("openai"):
            print(f"error: endpoint {args.endpoint}: {err}", file=sys.stderr)
            return 2
        raise
    summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"{args.model or args.endpoint} on {args.data}: {summary}")
    if args.output:
        result = {"model": args.model, "endpoint": args.endpoint, "data": args.data, "limit": args.limit,
                  "seed": args.seed, "metrics": metrics,
                  "predictions": [{"id": it.id, "prediction": p, "answers": list(it.answers)}
                                  for it, p in zip(items, predictions, strict=True)]}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
