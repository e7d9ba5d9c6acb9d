"""Trains the toy VLM: a small Qwen2-VL (vision encoder + merger + decoder) on easy-vqa, on CPU.

No pretrained VLM can be downloaded on these machines, so the accuracy benchmark needs a model
whose answers mean something: this one learns easy-vqa's train split (38,575 questions on 4,000
64x64 images of one coloured shape) from scratch. Architecture, tokenizer, chat template and
image processor are the tiny fixtures' (`tlq_vllm.testing.fixtures`) at a larger size, so the
result is a regular Qwen2-VL directory that transformers, vLLM and the calibrator load.

Loss: next-token cross-entropy on the answer tokens (the answer and the end of turn) only.
Deterministic: seeded initialisation and data order; float32 training, saved as bf16.

    python -m benchmarks.toyvlm.train --output tlq_vllm/assets/toyvlm-easyvqa --steps 1500

writes the model directory plus `training_log.json` (loss every `--log-every` steps, timings)
and `loss.png`. `python -m benchmarks.toyvlm.card` adds the model card once the FP accuracy
is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import time
from pathlib import Path

import torch

from tlq_vllm.testing.fixtures import (
    QWEN_SPECIAL_TOKENS,
    FixtureRecipe,
    TextDims,
    make_config,
    make_processor,
    train_tokenizer,
)

# About 11 M parameters: a 4-layer Qwen2 decoder (hidden 256, MLP 1024) and a 4-block ViT (256 wide)
# whose 2x2 patch merger turns a 112x112 image (easy-vqa's 64x64, upscaled by the processor's pixel
# floor) into 16 image tokens.
TOYVLM_RECIPE = FixtureRecipe(
    "toyvlm-easyvqa",
    "qwen2_vl",
    text=TextDims(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    vision_hidden_size=256,
    vision_intermediate_size=1024,
    vision_depth=4,
    vision_heads=4,
    tokenizer_vocab_size=1024,
    seed=0,
)


def build_model(recipe: FixtureRecipe = TOYVLM_RECIPE):
    from transformers import AutoModelForImageTextToText, GenerationConfig

    tokenizer = train_tokenizer(QWEN_SPECIAL_TOKENS, recipe.tokenizer_vocab_size)
    config = make_config(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, make_processor(recipe, tokenizer)


def encode_images(processor, paths: dict[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image through the real image processor once: [N, patches, features] and its grid."""
    from PIL import Image

    ids = sorted(paths)
    first = processor.image_processor(images=[Image.open(paths[ids[0]]).convert("RGB")], return_tensors="pt")
    patches = torch.empty((max(ids) + 1, *first["pixel_values"].shape), dtype=torch.float32)
    for i in ids:
        out = processor.image_processor(images=[Image.open(paths[i]).convert("RGB")], return_tensors="pt")
        patches[i] = out["pixel_values"]
    return patches, first["image_grid_thw"][0]


def encode_texts(processor, questions: list[str], answers: list[str], image_tokens: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + end of turn, number of answer tokens) per question, through
    the chat template, with the image placeholder expanded to the image's token count (what the
    processor does)."""
    tokenizer = processor.tokenizer
    encoded = []
    for q, a in zip(questions, answers, strict=True):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(a + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        encoded.append((p_ids + a_ids, len(a_ids)))
    return encoded


def make_batch(items, patches, grid_thw, pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the answer tokens only (`mm_token_type_ids` marks image
    tokens for M-RoPE, as the processor does)."""
    length = max(len(ids) for ids, _, _ in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    for row, (ids, n_answer, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, len(ids) - n_answer : len(ids)] = torch.tensor(ids[-n_answer:])
    pixel_values = torch.cat([patches[image_id] for _, _, image_id in items])
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "mm_token_type_ids": (input_ids == image_token_id).long(),
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw.repeat(len(items), 1),
    }


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log["history"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in log["history"]], label="train loss (answer tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"toy VLM on easy-vqa ({log['parameters'] / 1e6:.1f} M parameters)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import easy_vqa
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="tlq_vllm/assets/toyvlm-easyvqa")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    started = time.time()
    model, processor = build_model()
    tokenizer = processor.tokenizer
    image_token_id = model.config.image_token_id
    questions, answers, image_ids = easy_vqa.get_train_questions()
    patches, grid_thw = encode_images(processor, easy_vqa.get_train_image_paths())
    image_tokens = int(grid_thw.prod()) // processor.image_processor.merge_size**2
    texts = encode_texts(processor, questions, answers, image_tokens)
    items = [(ids, n, image_id) for (ids, n), image_id in zip(texts, image_ids, strict=True)]
    prepared = time.time() - started
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy VLM: {n_params / 1e6:.2f} M parameters; {len(items)} training questions; "
          f"data prepared in {prepared:.0f} s")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    order_rng = random.Random(args.seed)
    order: list[int] = []
    history, window = [], []
    model.train()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        if len(order) < args.batch_size:
            epoch = list(range(len(items)))
            order_rng.shuffle(epoch)
            order.extend(epoch)
        batch_ids, order = order[: args.batch_size], order[args.batch_size :]
        batch = make_batch([items[i] for i in batch_ids], patches, grid_thw, tokenizer.pad_token_id, image_token_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "loss": sum(window) / len(window),
                            "elapsed_s": round(time.time() - started, 1)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            window = []

    out = Path(args.output)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    log = {
        "recipe": TOYVLM_RECIPE.name,
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "train_questions": len(items),
        "epochs": round(args.steps * args.batch_size / len(items), 2),
        "wall_s": round(time.time() - started, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "history": history,
    }
    (staging / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot_loss(log, staging / "loss.png")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"saved {out} ({log['wall_s'] / 60:.1f} min, final loss {history[-1]['loss']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
