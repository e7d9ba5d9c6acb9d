"""Trains the toy VLM: a small Qwen2-VL (vision encoder + merger + decoder) on easy-vqa, on CPU.

No pretrained VLM can be downloaded on these machines, so the accuracy benchmark needs a model
whose answers mean something: this one learns easy-vqa's train split (38,575 questions on 4,000
64x64 images of one coloured shape) from scratch. Architecture, tokenizer, chat template and
image processor are the tiny fixtures' (`tlq_vllm.models.tiny`) at a larger size, so the
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
import platform
import random
import time
from pathlib import Path

import torch

from benchmarks.toyvlm.common import (
    encode_texts,
    learning_rate,
    make_batch,
    make_optimizer,
    new_model,
    save_model_dir,
    train_step,
)
from tlq_vllm.models.tiny import (
    QWEN_SPECIAL_TOKENS,
    FixtureRecipe,
    TextDims,
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
    tokenizer = train_tokenizer(QWEN_SPECIAL_TOKENS, recipe.tokenizer_vocab_size)
    return new_model(recipe, tokenizer), make_processor(recipe, tokenizer)


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

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
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
        window.append(train_step(model, optimizer, batch, learning_rate(step, args.steps, args.lr, args.warmup)))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "loss": sum(window) / len(window),
                            "elapsed_s": round(time.time() - started, 1)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            window = []

    out = Path(args.output)
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
    save_model_dir(model, processor, log, out, "toy VLM on easy-vqa")
    print(f"saved {out} ({log['wall_s'] / 60:.1f} min, final loss {history[-1]['loss']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
