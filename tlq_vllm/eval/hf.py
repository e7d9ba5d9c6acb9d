"""The transformers backend: greedy answers and teacher-forced answer-token distributions.

It evaluates what a platform cannot serve (here: W4A16/W3A16 have no CPU kernel in stock vLLM on
an AVX2 machine) with the checkpoint's exact numerics: compressed-tensors weights are
dequantized once (the integers times the stored scales, which is what every W*A16 kernel
multiplies with), and for A8 schemes every quantized linear's input is fake-quantized per token
exactly as vLLM's int8 GEMM quantizes it (`quantizer.fake_quantize_activations_per_token`).
Compute runs in float32 so the only deviations from FP are the quantization's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tlq_vllm.eval.vqa import VQAItem


def load_model(model_dir: str | Path, *, dtype=torch.float32):
    """(model, processor); a compressed-tensors checkpoint is dequantized and, for A8 schemes,
    gets per-token int8 activation quantization on its quantized linears."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, CompressedTensorsConfig

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.get("quantization_config")
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quant else {}
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, **kwargs).eval()
    model.to(dtype)  # decompressed weights come back in the scales' dtype (bf16); bf16 -> float32 is exact
    if quant:
        add_activation_quantization(model, quant)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor


def add_activation_quantization(model, quantization_config: dict) -> int:
    """Forward pre-hooks that quantize the inputs of the linears whose config group has
    `input_activations` (dynamic, per token, 8-bit symmetric: what vLLM's W8A8/W4A8 kernels do)."""
    from compressed_tensors.utils import match_named_modules

    from tlq_vllm.calibrate.quantizer import fake_quantize_activations_per_token

    ignore = quantization_config.get("ignore") or []
    hooked = 0
    for group in quantization_config.get("config_groups", {}).values():
        act = group.get("input_activations")
        if not act:
            continue
        if act.get("strategy") != "token" or not act.get("dynamic") or act.get("type") != "int":
            raise ValueError(f"unsupported activation quantization {act}: only dynamic int per-token")
        bits = int(act["num_bits"])

        def hook(module, args, bits=bits):
            return (fake_quantize_activations_per_token(args[0], bits, kernel="cpu"), *args[1:])

        for _, module in match_named_modules(model, group["targets"], ignore):
            module.register_forward_pre_hook(hook)
            hooked += 1
    if any(g.get("input_activations") for g in quantization_config.get("config_groups", {}).values()) and not hooked:
        raise ValueError("the checkpoint quantizes activations, but no module matched its targets")
    return hooked


def _prompts(processor, items: list[VQAItem]) -> list[str]:
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}],
            add_generation_prompt=True,
        )
        for it in items
    ]


def _images(items: list[VQAItem]):
    from PIL import Image

    return [Image.open(it.image).convert("RGB") for it in items]


def batches(items: list, size: int, desc: str, progress: bool):
    bar = tqdm(total=len(items), desc=desc, unit="q", disable=not progress, leave=False)
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield chunk
        bar.update(len(chunk))
    bar.close()


@dataclass
class EncodedBatch:
    """A teacher-forced batch (prompt + reference answer + end of turn, left padded, so every
    row ends with its answer) and each row's number of answer tokens. Encoding runs the image
    processor, which costs more than the toy model's forward: encode once, evaluate many models.

    Qwen-style processors flatten each image into patch rows (`image_grid_thw` gives their count);
    those rows are kept once per distinct image (`patches`, shared between batches) and joined into
    `pixel_values` when the batch is used: the scenes ask 7 questions about each image, and 3,500
    questions' own copies of 400 float32 patch rows each would hold 6.6 GB."""

    items: list[VQAItem]
    text_inputs: dict[str, torch.Tensor]
    answer_ids: list[list[int]]
    patches: list[torch.Tensor] | None = None  # per row: its image's patch rows (shared tensors)

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        if self.patches is None:
            return self.text_inputs
        return {**self.text_inputs, "pixel_values": torch.cat(self.patches)}


def encode(processor, items: list[VQAItem], *, batch_size: int = 64, progress: bool = True) -> list[EncodedBatch]:
    tokenizer = processor.tokenizer
    encoded, patches_of = [], {}
    for chunk in batches(items, batch_size, "encode", progress):
        answers = [tokenizer(it.answers[0] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                   for it in chunk]
        texts = [p + it.answers[0] + tokenizer.eos_token for p, it in zip(_prompts(processor, chunk), chunk,
                                                                           strict=True)]
        inputs = dict(processor(text=texts, images=_images(chunk), padding=True, return_tensors="pt"))
        for row, ids in enumerate(answers):
            if inputs["input_ids"][row, -len(ids) :].tolist() != ids:
                raise ValueError(f"{chunk[row].id}: the answer's tokens do not end the templated text")
        patches = None
        if "image_grid_thw" in inputs and inputs["pixel_values"].ndim == 2:
            pixels = inputs.pop("pixel_values")
            ends = inputs["image_grid_thw"].prod(-1).cumsum(0).tolist()
            patches = []
            for item, start, end in zip(chunk, [0, *ends[:-1]], ends, strict=True):
                key = (item.image, end - start)
                if key not in patches_of:
                    patches_of[key] = pixels[start:end].clone()
                patches.append(patches_of[key])
        encoded.append(EncodedBatch(chunk, inputs, answers, patches))
    return encoded


@torch.inference_mode()
def answer_log_probs(model, encoded: list[EncodedBatch]) -> list[torch.Tensor]:
    """Per item, the log-softmax at the positions that predict the reference answer's tokens and
    the end of turn ([n_answer_tokens, vocab], float32), from one teacher-forced forward a batch."""
    log_probs = []
    for batch in encoded:
        logits = model(**batch.inputs).logits  # [B, T, V]
        log_probs += [torch.log_softmax(logits[row, -len(ids) - 1 : -1].float(), dim=-1)
                      for row, ids in enumerate(batch.answer_ids)]
    return log_probs


@torch.inference_mode()
def evaluate(model, processor, encoded: list[EncodedBatch], *, max_new_tokens: int = 8,
             progress: bool = True) -> tuple[list[str], list[torch.Tensor]]:
    """Greedy answers and, per item, `answer_log_probs`.

    One teacher-forced forward gives both where the model's argmax reproduces the reference at
    every answer position: greedy decoding then generates exactly the reference. The other items
    (the model's mistakes) are decoded greedily with `generate` from the prompt."""
    predictions, log_probs, wrong = [], [], []
    bar = tqdm(total=sum(len(b.items) for b in encoded), desc="evaluate", unit="q", disable=not progress, leave=False)
    for batch in encoded:
        for item, ids, lp in zip(batch.items, batch.answer_ids, answer_log_probs(model, [batch]), strict=True):
            log_probs.append(lp)
            if lp.argmax(-1).tolist() == ids:
                predictions.append(item.answers[0])
            else:
                predictions.append(None)
                wrong.append((len(predictions) - 1, item))
        bar.update(len(batch.items))
    bar.close()
    for start in range(0, len(wrong), 64):
        chunk = wrong[start : start + 64]
        for (index, _), answer in zip(chunk, generate(model, processor, [it for _, it in chunk], max_new_tokens),
                                      strict=True):
            predictions[index] = answer
    return predictions, log_probs


def generate(model, processor, items: list[VQAItem], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers (chat template, generation prompt, stop at end of turn)."""
    inputs = processor(text=_prompts(processor, items), images=_images(items), padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def agreement_and_kl(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference || candidate) over all answer-token positions."""
    ref = torch.cat(reference)
    cand = torch.cat(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"answer-token distributions differ in shape: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    kl = (ref.exp() * (ref - cand)).sum(-1)
    return {
        "top1_agreement": float((ref.argmax(-1) == cand.argmax(-1)).float().mean()),
        "mean_kl": float(kl.mean()),
        "answer_positions": int(ref.shape[0]),
    }

