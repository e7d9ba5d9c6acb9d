"""Trains toy VLM v2: a capacity-limited Qwen2-VL on the procedural scenes, checkpointed and resumable.

The accuracy benchmark needs a model whose task exceeds its capacity, with real-VLM token
statistics: 280x280 scene images give 100 vision tokens (of about 130-170 in a sequence) and
answers run from one token to a 40-token caption (`tlq_vllm.scenes`, docs/testbed.md). The model
is a regular Qwen2-VL directory (the fixtures' architecture, tokenizer kind, chat template and
image processor at a chosen size), so transformers, vLLM and the calibrator load it.

Data: example n of the run is train scene n (a fresh scene every example: the split is unlimited)
with one of its items, caption weighted double; loss on the answer tokens (and the end of turn).
Every batch is a pure function of (seed, step), so resuming needs only the model, the optimizer
and the step: `--resume` continues bit-identically on the CPU (the test checks it). CUDA when
available (fp32, TF32 matmuls), else the CPU.

    python -m benchmarks.toyvlm2.train --steps 8000 --output tlq_vllm/assets/toyvlm-scenes
    python -m benchmarks.toyvlm2.train --steps 8000 --output ... --resume   # after a stop

Checkpoints (`last.pt`: model, optimizer, step, loss history, RNG states) go to --checkpoint-dir
(default `<cache root>/toyvlm2/<recipe>`), every --checkpoint-every steps and when the run stops
(--stop-at, --time-limit, or the end). The final directory holds the bf16 model, processor,
`training_log.json` (train loss every --log-every steps, validation loss and exact-answer rate
per type every --eval-every steps) and `loss.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from benchmarks.toyvlm import common
from tlq_vllm import scenes
from tlq_vllm.models.tiny import QWEN_SPECIAL_TOKENS, FixtureRecipe, TextDims, make_processor, train_tokenizer
from tlq_vllm.paths import cache_root

# About 5 M parameters (10 MB in bf16): a 4-layer Qwen2 decoder (hidden 256, MLP 768: the part
# that is quantized, small beside its task of captions of up to 5 objects and 7 question types)
# and a 4-block ViT 128 wide (its 400 patches an image are most of a step's compute).
RECIPES = {
    r.name: r
    for r in (
        FixtureRecipe(
            "toyvlm-scenes", "qwen2_vl",
            text=TextDims(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=1024),
            vision_hidden_size=128, vision_intermediate_size=512, vision_depth=4, vision_heads=2,
            tokenizer_vocab_size=1024,
        ),
        # for tests of the trainer itself: seconds a step fewer
        FixtureRecipe(
            "toyvlm-scenes-tiny", "qwen2_vl",
            text=TextDims(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=1024),
            vision_hidden_size=32, vision_intermediate_size=64, vision_depth=1, vision_heads=1,
            tokenizer_vocab_size=1024,
        ),
    )
}
ITEM_WEIGHTS = {t: (2 if t == "caption" else 1) for t in scenes.TASK_TYPES}
CORPUS_SCENES = 2000  # train scenes whose text the tokenizer learns (the vocabulary is closed)
# What must match for --resume to continue the same run.
RUN_SETTINGS = ("recipe", "steps", "batch_size", "lr", "warmup", "weight_decay", "seed", "init_from", "first_example")


def scene_corpus() -> list[str]:
    items = [qa for i in range(CORPUS_SCENES) for qa in scenes.generate("train", i).items]
    chat = "system user assistant You are a helpful assistant."
    return [*(t for qa in items for t in (qa.question, qa.answer)), chat]


def build_model(recipe: FixtureRecipe):
    tokenizer = train_tokenizer(QWEN_SPECIAL_TOKENS, recipe.tokenizer_vocab_size, scene_corpus())
    processor = make_processor(recipe, tokenizer, max_pixels=scenes.CANVAS * scenes.CANVAS)
    return common.new_model(recipe, tokenizer), processor


def train_example(n: int, seed: int) -> tuple[str, int, scenes.QAItem]:
    """Example n of a run: train scene n and one of its items (caption weighted double)."""
    sample = scenes.generate("train", n)
    ticket = random.Random(f"toyvlm2/{seed}/{n}").random() * sum(ITEM_WEIGHTS.values())
    for qa in sample.items:
        ticket -= ITEM_WEIGHTS[qa.type]
        if ticket < 0:
            return "train", n, qa
    return "train", n, sample.items[-1]


def validation_example(v: int) -> tuple[str, int, scenes.QAItem]:
    """Validation example v: validation scene v, item type v mod 8 (every type equally often)."""
    return "validation", v, scenes.generate("validation", v).items[v % len(scenes.TASK_TYPES)]


def encode_examples(processor, image_token_id: int, examples) -> dict[str, torch.Tensor]:
    """A training batch from (split, index, item) triples: rendered, processed, answer-only labels."""
    images = [scenes.render(scenes.sample_scene(split, index)) for split, index, _ in examples]
    vision = processor.image_processor(images=images, return_tensors="pt")
    grid = vision["image_grid_thw"][0]
    patches = vision["pixel_values"].view(len(images), int(grid.prod()), -1)
    image_tokens = int(grid.prod()) // processor.image_processor.merge_size**2
    texts = common.encode_texts(processor, [qa.question for *_, qa in examples], [qa.answer for *_, qa in examples],
                         image_tokens)
    items = [(ids, n_answer, row) for row, (ids, n_answer) in enumerate(texts)]
    return common.make_batch(items, patches, grid, processor.tokenizer.pad_token_id, image_token_id)


class StepBatches(torch.utils.data.Dataset):
    """Batch of step s for s in [start, stop): a pure function of (seed, s), so DataLoader workers
    can build them in any order and a resumed run sees exactly the batches it would have."""

    def __init__(self, processor, image_token_id: int, batch_size: int, seed: int, start: int, stop: int,
                 first_example: int = 0):
        self.processor, self.image_token_id = processor, image_token_id
        self.batch_size, self.seed, self.start, self.stop = batch_size, seed, start, stop
        self.first_example = first_example

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step = self.start + i
        first = self.first_example + step * self.batch_size
        examples = [train_example(n, self.seed) for n in range(first, first + self.batch_size)]
        return encode_examples(self.processor, self.image_token_id, examples)


def init_weights(model, directory: Path, tokenizer) -> None:
    """The weights of a saved toy VLM v2 (bf16, read by transformers) into this fresh float32 model of
    the same recipe; the tokenizer is rebuilt from the same corpus, so its vocabulary must match."""
    from transformers import AutoModelForImageTextToText

    if not (directory / "config.json").is_file():
        raise SystemExit(f"error: --init-from {directory}: not a model directory (no config.json)")
    saved_vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    if saved_vocab != json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]:
        raise SystemExit(f"error: --init-from {directory}: its tokenizer differs from this recipe's")
    state = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).state_dict()
    mine = model.state_dict()
    if state.keys() != mine.keys() or any(state[k].shape != mine[k].shape for k in mine):
        raise SystemExit(f"error: --init-from {directory}: its weights do not fit this recipe's model")
    model.load_state_dict(state)


def earlier_training(directory: Path) -> list[dict]:
    """What trained the --init-from model, run by run (oldest first), for the new run's log."""
    log_path = directory / "training_log.json"
    if not log_path.is_file():
        return [{"init_from": str(directory), "note": "no training_log.json"}]
    log = json.loads(log_path.read_text())
    losses = [r["loss"] for r in log["history"] if "loss" in r]
    held = [r["validation"] for r in log["history"] if "validation" in r]
    return [*log.get("earlier_runs", []),
            {k: log.get(k) for k in ("recipe", "steps", "batch_size", "lr", "warmup", "seed", "first_example",
                                     "examples_seen", "wall_s", "gpu", "torch")}
            | {"final_loss": losses[-1] if losses else None, "final_validation": held[-1] if held else None}]


def one_thread(_worker: int) -> None:
    """DataLoader workers build batches side by side: one torch thread each, not a core each."""
    torch.set_num_threads(1)


@torch.no_grad()
def validate(model, batches: list[tuple[list[str], dict]], device) -> dict[str, float]:
    """Teacher-forced validation: mean answer-token loss, and per type the share of examples whose
    every answer token is the argmax (what greedy decoding would answer exactly)."""
    model.eval()
    losses, right = [], {t: [] for t in scenes.TASK_TYPES}
    for types, batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        losses.append(out.loss.item())
        labels = batch["labels"][:, 1:]
        predicted = out.logits[:, :-1].argmax(-1)
        ok = ((predicted == labels) | (labels == -100)).all(-1)
        for t, good in zip(types, ok.tolist(), strict=True):
            right[t].append(good)
    model.train()
    return {"loss": sum(losses) / len(losses),
            **{f"exact_{t}": sum(v) / len(v) for t, v in right.items() if v}}


def checkpoint_state(model, optimizer, step, history, window, settings, elapsed) -> dict:
    return {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "history": history, "window": window, "settings": settings, "elapsed_s": elapsed,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def save_checkpoint(state: dict, directory: Path) -> None:
    """`last.pt`, written to a temporary file and renamed: a stop mid-write keeps the old one."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "last.pt.partial"
    torch.save(state, tmp)
    os.replace(tmp, directory / "last.pt")


def restore(path: Path, model, optimizer, settings: dict) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    earlier = {"init_from": None, "first_example": 0, **state["settings"]}  # checkpoints from before those settings
    differ = {k: (earlier[k], settings[k]) for k in RUN_SETTINGS if earlier[k] != settings[k]}
    if differ:
        raise SystemExit("error: --resume: the checkpoint is of a different run ("
                         + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in differ.items()) + f"): {path}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="tlq_vllm/assets/toyvlm-scenes")
    parser.add_argument("--recipe", default="toyvlm-scenes", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=8000, help="length of the schedule (default 8000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and item choice (default 0)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=500, help="validation every N steps (0: never)")
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--checkpoint-dir", help="default <cache root>/toyvlm2/<recipe>")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint directory's last.pt")
    parser.add_argument("--stop-at", type=int, help="stop (checkpointed) after this step, to resume later")
    parser.add_argument("--time-limit", type=float, help="stop (checkpointed) after this many seconds")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, 8 with CUDA)")
    parser.add_argument("--log-json", help="also write the training log here at every log step")
    parser.add_argument("--init-from", help="start from this model directory's weights (a committed toy VLM v2: "
                        "another schedule on top of earlier training, when a GPU session is too short for one run)")
    parser.add_argument("--first-example", type=int, default=0,
                        help="train scene of the run's first example (default 0; after --init-from, past the "
                             "examples the earlier runs saw: their log's examples_seen)")
    parser.add_argument("--export", action="store_true",
                        help="write --output from the checkpoint directory's last.pt and stop (a run stopped before "
                             "its schedule ended: its log says at which step)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("error: --steps and --batch-size must be at least 1")

    started = time.time()
    recipe = dataclasses.replace(RECIPES[args.recipe], seed=args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else cache_root() / "toyvlm2" / recipe.name
    settings = {"recipe": recipe.name, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                "warmup": args.warmup, "weight_decay": args.weight_decay, "seed": args.seed,
                "init_from": str(args.init_from) if args.init_from else None, "first_example": args.first_example}

    model, processor = build_model(recipe)
    earlier_runs = []
    if args.init_from:
        init_weights(model, Path(args.init_from), processor.tokenizer)
        earlier_runs = earlier_training(Path(args.init_from))
    image_token_id = model.config.image_token_id
    optimizer = common.make_optimizer(model, args.lr, args.weight_decay)
    step, history, window, elapsed_before = 0, [], [], 0.0
    if args.resume or args.export:
        if not (checkpoint_dir / "last.pt").is_file():
            flag = "--export" if args.export else "--resume"
            raise SystemExit(f"error: {flag}: no checkpoint at {checkpoint_dir / 'last.pt'}")
        state = restore(checkpoint_dir / "last.pt", model, optimizer, settings)
        step, history, window, elapsed_before = state["step"], state["history"], state["window"], state["elapsed_s"]
        print(f"resumed at step {step} from {checkpoint_dir / 'last.pt'}")
    model.to(device)
    for group in optimizer.state.values():  # optimizer moments follow their parameters
        for k, v in group.items():
            if torch.is_tensor(v) and k != "step":
                group[k] = v.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    validation = []
    if args.eval_every and not args.export:  # --export trains nothing, so validates nothing
        examples = [validation_example(v) for v in range(args.eval_examples)]
        for i in range(0, len(examples), args.batch_size):
            chunk = examples[i : i + args.batch_size]
            validation.append(([qa.type for *_, qa in chunk], encode_examples(processor, image_token_id, chunk)))
    print(f"toy VLM v2 ({recipe.name}): {n_params / 1e6:.2f} M parameters on {device}; steps {step}..{args.steps} "
          f"of batch {args.batch_size}; checkpoints in {checkpoint_dir}")

    def log_record() -> dict:
        return {"recipe": recipe.name, "parameters": n_params, **settings, "step": step,
                "examples_seen": step * args.batch_size,
                "wall_s": round(elapsed_before + time.time() - started, 1), "device": str(device),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "item_weights": ITEM_WEIGHTS, "earlier_runs": earlier_runs,
                "history": history}

    if args.export:
        return export(model, processor, log_record(), Path(args.output), recipe.name)

    def checkpoint() -> None:
        save_checkpoint(checkpoint_state(model, optimizer, step, history, window, settings,
                                         elapsed_before + time.time() - started), checkpoint_dir)

    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    loader = torch.utils.data.DataLoader(StepBatches(processor, image_token_id, args.batch_size, args.seed, step, stop,
                                                     args.first_example),
                                         batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=one_thread,
                                         prefetch_factor=4 if workers else None)
    model.train()
    tick, tick_step = time.time(), step
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = common.learning_rate(step, args.steps, args.lr, args.warmup)
        window.append(common.train_step(model, optimizer, batch, lr))
        step += 1
        record = None
        if step % args.log_every == 0 or step == args.steps:
            per_step = (time.time() - tick) / max(1, step - tick_step)
            record = {"step": step, "loss": sum(window) / len(window),
                      "elapsed_s": round(elapsed_before + time.time() - started, 1), "s_per_step": round(per_step, 3)}
            window, tick, tick_step = [], time.time(), step
        if validation and (step % args.eval_every == 0 or step == args.steps):
            record = {**(record or {"step": step}), "validation": validate(model, validation, device)}
        if record:
            history.append(record)
            print(json.dumps(record), flush=True)
            if args.log_json:
                Path(args.log_json).write_text(json.dumps(log_record(), indent=1) + "\n")
        out_of_time = args.time_limit is not None and time.time() - started > args.time_limit
        if step % args.checkpoint_every == 0 or step == stop or out_of_time:
            checkpoint()
        if out_of_time and step < stop:
            print(f"stopped at step {step} (--time-limit {args.time_limit:g} s); continue with --resume")
            return 0
    if step < args.steps:
        print(f"stopped at step {step} (--stop-at); continue with --resume")
        return 0
    return export(model, processor, log_record(), Path(args.output), recipe.name)


def export(model, processor, log: dict, output: Path, recipe: str) -> int:
    """The model directory; `schedule_finished` in its log says whether the cosine schedule ran out."""
    log = {**log, "schedule_finished": log["step"] == log["steps"]}
    common.save_model_dir(model.cpu(), processor, log, output, f"toy VLM v2 on scenes ({recipe})")
    losses = [r["loss"] for r in log["history"] if "loss" in r]
    print(f"saved {output} at step {log['step']} of {log['steps']} "
          f"({log['wall_s'] / 60:.1f} min, final loss {losses[-1] if losses else float('nan'):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
