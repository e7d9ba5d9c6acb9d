"""What both toy VLM trainers share: the model from a recipe, answer-only batches, the step, the
schedule, and writing the model directory.

v1 (`benchmarks.toyvlm.train`, easy-vqa) and v2 (`benchmarks.toyvlm2.train`, the procedural
scenes) differ in their data, tokenizer corpus and image size, not in how a step is taken.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from tlq_vllm.models.tiny import FixtureRecipe, make_config


def new_model(recipe: FixtureRecipe, tokenizer):
    """A float32 Qwen2-VL of the recipe's shape, seeded, with greedy generation ending the turn."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    config = make_config(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


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
    """Right-padded batch of (ids, number of answer tokens, image id) with labels on the answer
    tokens only (`mm_token_type_ids` marks image tokens for M-RoPE, as the processor does);
    `patches[image id]` is the image's patch features, all images of one grid `grid_thw`."""
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


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices other than embeddings."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_step(model, optimizer, batch: dict[str, torch.Tensor], lr: float) -> float:
    """One optimizer step on the batch's answer-token loss (gradient norm clipped to 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def plot_loss(log: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log["history"] if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (answer tokens)")
    held_out = [r for r in log["history"] if "validation" in r]
    if held_out:
        ax.plot([r["step"] for r in held_out], [r["validation"]["loss"] for r in held_out], "o-",
                label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"{title} ({log['parameters'] / 1e6:.1f} M parameters)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_model_dir(model, processor, log: dict, out: Path, title: str) -> None:
    """The model in bf16 with its processor, `training_log.json` and `loss.png`, written to a
    staging directory and renamed into place (never half a model directory at `out`)."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    plot_loss(log, staging / "loss.png", title)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
