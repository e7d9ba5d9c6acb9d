"""Offline tiny VLMs of real architectures, for tests and benchmarks (`--model fixture:<name>`).

No pretrained VLM can be downloaded on these machines, so each fixture is a real transformers
architecture (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, LLaVA-OneVision) at a few million
parameters with random, seeded weights, a byte-level BPE tokenizer trained locally on easy-vqa's text with
the family's special tokens and chat template, and the family's image processor. The resulting directory is
what a user would download from a hub: `AutoModelForImageTextToText`, `AutoProcessor` and
`vllm.LLM` all load it.

Dimensions are chosen for quantization: every decoder linear has in/out features that are
multiples of 32 and input features that are multiples of 128 (group-128 scales and vLLM's CPU
kernels need that).

Fixtures are cached under `$TLQ_CACHE_DIR/fixtures` (default `~/.cache/tlq_vllm/fixtures`),
keyed by a hash of the recipe and the library versions that shape the files; a build writes to
a temporary directory and renames it into place, so a cached fixture is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tlq_vllm.models.adapters import adapter_for_model_type, rename_saved_keys
from tlq_vllm.paths import cache_root

FIXTURE_FORMAT_VERSION = 2

# Chat templates: the families' own (abridged to image + text content, which is what this
# project uses; video placeholders kept so the processors' expectations hold).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's instruct template: the same turns and placeholders, without a default system prompt.
QWEN3_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")

LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<image>\n"
    "{% elif content['type'] == 'video' or 'video' in content %}<video>\n{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


@dataclass(frozen=True)
class TextDims:
    """The Qwen2 decoder shared by all three families."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    vocab_size: int = 0  # embedding rows; 0: the tokenizer's size, padded (a real model's rows beyond it go unused)
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class ExpertDims:
    """A sparse MoE decoder's experts (Qwen3-VL-MoE): every layer's MLP is `count` experts of width
    `intermediate_size`, `top_k` of them per token."""

    count: int = 4
    top_k: int = 2
    intermediate_size: int = 384  # a multiple of the 128 groups, and neither it nor twice it is the hidden 256: the
    # fused tensors are not square, so their saved orientation (the hub's, transposed) is unambiguous to loaders


@dataclass(frozen=True)
class LinearAttentionDims:
    """A hybrid decoder's Gated DeltaNet layers (Qwen3.5): every `full_attention_interval`-th layer is full
    attention, the others linear attention with these heads. Head dims of 128, as the real models': vLLM's
    CPU kernel for the recurrence refused 32 ("Unexpected head dim size, 32")."""

    key_heads: int = 2
    value_heads: int = 4
    head_dim: int = 128
    full_attention_interval: int = 4


@dataclass(frozen=True)
class FixtureRecipe:
    """Everything that decides a fixture's files; its hash is the cache key."""

    name: str
    family: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe" | "qwen3_5" | "llava_onevision"
    text: TextDims = field(default_factory=TextDims)
    experts: ExpertDims | None = None  # the MoE families' experts (None: a dense MLP)
    linear_attention: LinearAttentionDims | None = None  # a hybrid decoder's linear-attention layers
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 512
    vision_depth: int = 2
    vision_heads: int = 2
    tokenizer_vocab_size: int = 1024
    seed: int = 0
    max_pixels: int | None = None  # the processor's image cap (None: the fixtures' small one, make_processor)

    def cache_key(self) -> str:
        import tokenizers
        import transformers

        payload = {
            "recipe": asdict(self),
            "format": FIXTURE_FORMAT_VERSION,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


FIXTURES: dict[str, FixtureRecipe] = {
    r.name: r
    for r in (
        FixtureRecipe("qwen2-vl", "qwen2_vl"),
        FixtureRecipe("qwen2.5-vl", "qwen2_5_vl", vision_intermediate_size=256),
        FixtureRecipe("llava-onevision", "llava_onevision"),
        # Qwen3-VL: three deepstack levels (vision blocks 0-2 feed decoder layers 0-2), block 3 the merger
        FixtureRecipe("qwen3-vl", "qwen3_vl", vision_depth=4),
        # Qwen3-VL-MoE: the same, with every decoder MLP 4 experts of which 2 route each token
        FixtureRecipe("qwen3-vl-moe", "qwen3_vl_moe", vision_depth=4, experts=ExpertDims()),
        # Qwen3.5: decoder layers 0-2 Gated DeltaNet linear attention, layer 3 gated full attention
        FixtureRecipe("qwen3.5", "qwen3_5", linear_attention=LinearAttentionDims()),
    )
}


# Random-weight models at a real model's width, for benchmarks that must be bound by weight bytes
# (serving, calibration speed): not in FIXTURES, so tests never build them by accident. Their processor
# takes images as large as the real model's does (Qwen2-VL's preprocessor_config.json: max_pixels), so
# a 448x448 image gives the 256 vision tokens it gives a real Qwen2-VL.
QWEN2_VL_MAX_PIXELS = 12845056
REAL_WIDTH = {
    r.name: r
    for r in (
        # Qwen2-VL-2B's decoder (tlq_vllm/models/config_snapshots/qwen2-vl-2b.json) with a small vision tower:
        # 1.55 B parameters, 3.1 GB bf16, of which 0.47 GB are the tied embeddings.
        FixtureRecipe("qwen2-vl-2b-width", "qwen2_vl",
                      text=TextDims(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                    vocab_size=151936, tie_word_embeddings=True),
                      max_pixels=QWEN2_VL_MAX_PIXELS),
        # The same decoder cut to 4 layers (0.42 B parameters, 0.84 GB bf16): the calibration benchmark's model,
        # whose time and memory per layer are a real 2B's.
        FixtureRecipe("qwen2-vl-2b-width-4l", "qwen2_vl",
                      text=TextDims(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                    vocab_size=151936, tie_word_embeddings=True),
                      max_pixels=QWEN2_VL_MAX_PIXELS),
        # Qwen2-VL-7B's decoder (config_snapshots/qwen2-vl-7b.json), 2 layers: 1.56 B parameters, 3.1 GB bf16,
        # of which 1.09 GB are the untied embeddings and lm_head.
        FixtureRecipe("qwen2-vl-7b-width-2l", "qwen2_vl",
                      text=TextDims(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                    vocab_size=152064, tie_word_embeddings=False),
                      max_pixels=QWEN2_VL_MAX_PIXELS),
    )
}


def build_fixture(name: str, *, cache_dir: Path | None = None, rebuild: bool = False) -> Path:
    """Returns the directory of fixture `name` (FIXTURES or REAL_WIDTH), building it once if not cached
    (about 10 s for a tiny fixture)."""
    recipes = {**FIXTURES, **REAL_WIDTH}
    if name not in recipes:
        raise ValueError(f"unknown fixture {name!r}; choose one of {', '.join(recipes)}")
    recipe = recipes[name]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "fixtures"
    target = root / f"{name}-{recipe.cache_key()}"
    if target.is_dir() and not rebuild:
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write_fixture(recipe, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is readable like any other
        if rebuild and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent builder winning the race: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_fixture(recipe: FixtureRecipe, out_dir: Path) -> None:
    """Writes model weights, configs, tokenizer, processor and generation config to `out_dir`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig


    is_llava = recipe.family == "llava_onevision"
    tokenizer = train_tokenizer(
        LLAVA_SPECIAL_TOKENS if is_llava else QWEN_SPECIAL_TOKENS, recipe.tokenizer_vocab_size
    )
    config = make_config(recipe, tokenizer)
    torch.manual_seed(recipe.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    rename_saved_keys(out_dir, adapter_for_model_type(config.model_type))
    make_processor(recipe, tokenizer, max_pixels=recipe.max_pixels).save_pretrained(out_dir)


def easy_vqa_corpus() -> list[str]:
    """The text a fixture's tokenizer learns from: easy-vqa's questions and answers plus the
    chat-template words, so prompts tokenize into a realistic number of tokens."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    return [*questions, *answers, "system user assistant You are a helpful assistant."]


def train_tokenizer(special_tokens: list[str], vocab_size: int, corpus: list[str] | None = None):
    """A byte-level BPE (the Qwen2 kind) trained on `corpus` (default easy-vqa's text), wrapped as
    Qwen2's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(easy_vqa_corpus() if corpus is None else corpus, trainer)
    extra = [t for t in special_tokens if t not in ("<|endoftext|>", "<|im_end|>")]
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=extra,
    )


def padded_vocab_size(tokenizer) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of 64."""
    return -(-len(tokenizer) // 64) * 64


def text_config_dict(recipe: FixtureRecipe, tokenizer, *, mrope: bool) -> dict:
    t = recipe.text
    head_dim = t.hidden_size // t.num_attention_heads
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if mrope:  # temporal/height/width frequency split summing to head_dim / 2, in Qwen2-VL's 2:3:3
        unit = head_dim // 16
        rope["mrope_section"] = [2 * unit, 3 * unit, 3 * unit]
    return {
        "model_type": "qwen2",
        "vocab_size": t.vocab_size or padded_vocab_size(tokenizer),
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }


def make_config(recipe: FixtureRecipe, tokenizer):
    """The family's real transformers config class, at fixture size."""
    from transformers import LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = recipe.text
    if recipe.family in ("qwen2_vl", "qwen2_5_vl"):
        if recipe.family == "qwen2_vl":
            config_cls, architecture = Qwen2VLConfig, "Qwen2VLForConditionalGeneration"
            vision = {
                "embed_dim": recipe.vision_hidden_size,
                "hidden_size": text.hidden_size,
                "mlp_ratio": recipe.vision_intermediate_size // recipe.vision_hidden_size,
            }
        else:  # Qwen2.5-VL: gated vision MLP, window attention with full attention in the last block
            config_cls, architecture = Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration"
            vision = {
                "hidden_size": recipe.vision_hidden_size,
                "intermediate_size": recipe.vision_intermediate_size,
                "out_hidden_size": text.hidden_size,
                "fullatt_block_indexes": [recipe.vision_depth - 1],
                "window_size": 56,
            }
        text_cfg = {**text_config_dict(recipe, tokenizer, mrope=True), "model_type": f"{recipe.family}_text"}
        return config_cls(
            text_config=text_cfg,
            vision_config={"depth": recipe.vision_depth, "num_heads": recipe.vision_heads, **vision},
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            architectures=[architecture],
        )
    if recipe.family == "llava_onevision":
        return LlavaOnevisionConfig(
            text_config=text_config_dict(recipe, tokenizer, mrope=False),
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": recipe.vision_hidden_size,
                "intermediate_size": recipe.vision_intermediate_size,
                "num_hidden_layers": recipe.vision_depth,
                "num_attention_heads": recipe.vision_heads,
                "image_size": LLAVA_TILE,
                "patch_size": LLAVA_PATCH,
                "vision_use_head": False,  # LLaVA-OneVision uses patch features, not SigLIP's pooled head
            },
            image_token_index=ids("<image>"),
            video_token_index=ids("<video>"),
            image_grid_pinpoints=LLAVA_GRID_PINPOINTS,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            architectures=["LlavaOnevisionForConditionalGeneration"],
        )
    if recipe.family in ("qwen3_vl", "qwen3_vl_moe"):
        return qwen3_vl_config(recipe, tokenizer)
    if recipe.family == "qwen3_5":
        return qwen3_5_config(recipe, tokenizer)
    raise ValueError(f"unknown fixture family {recipe.family!r}")


# Qwen3-VL at fixture size: the real models' 16-pixel patches, 2x2 merge and deepstack, with three
# deepstack levels like the real models (transformers' default: vision blocks 8, 16, 24 of 27), here
# at the first vision blocks.
QWEN3_VL_DEEPSTACK_LEVELS = 3
QWEN3_VL_PATCH = 16


def qwen3_vl_config(recipe: FixtureRecipe, tokenizer):
    """Qwen3-VL: a Qwen3 decoder (q/k RMS norms, explicit head_dim, no biases, interleaved M-RoPE)
    and a ViT with learned positions whose intermediate blocks feed the deepstack mergers; with
    recipe.experts, Qwen3-VL-MoE: every decoder MLP a sparse MoE block (router + experts)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    ids = tokenizer.convert_tokens_to_ids
    head_dim = recipe.text.hidden_size // recipe.text.num_attention_heads
    unit = head_dim // 32  # Qwen3-VL's [24, 20, 20] of head_dim 128, scaled to this head_dim
    text_cfg = {
        **text_config_dict(recipe, tokenizer, mrope=False),
        "model_type": "qwen3_vl_moe_text" if recipe.experts else "qwen3_vl_text",
        "head_dim": head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                            "mrope_section": [6 * unit, 5 * unit, 5 * unit]},
    }
    config_cls, architecture = Qwen3VLConfig, "Qwen3VLForConditionalGeneration"
    if recipe.experts:
        e = recipe.experts
        text_cfg |= {"num_experts": e.count, "num_experts_per_tok": e.top_k, "decoder_sparse_step": 1,
                     "moe_intermediate_size": e.intermediate_size, "mlp_only_layers": [], "norm_topk_prob": True}
        config_cls, architecture = Qwen3VLMoeConfig, "Qwen3VLMoeForConditionalGeneration"
    return config_cls(
        text_config=text_cfg,
        vision_config={
            "depth": recipe.vision_depth,
            "hidden_size": recipe.vision_hidden_size,
            "intermediate_size": recipe.vision_intermediate_size,
            "num_heads": recipe.vision_heads,
            "patch_size": QWEN3_VL_PATCH,
            "out_hidden_size": recipe.text.hidden_size,
            "num_position_embeddings": 256,  # a 16 x 16 grid, resampled to each image's
            "deepstack_visual_indexes": list(range(QWEN3_VL_DEEPSTACK_LEVELS)),
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=recipe.text.tie_word_embeddings,
        architectures=[architecture],
    )


def qwen3_5_config(recipe: FixtureRecipe, tokenizer):
    """Qwen3.5 (dense): a hybrid decoder of Gated DeltaNet and gated full-attention layers (partial rotary
    embeddings: a quarter of each head, interleaved M-RoPE) and Qwen3-VL's tower without deepstack."""
    from transformers import Qwen3_5Config

    ids = tokenizer.convert_tokens_to_ids
    t, linear = recipe.text, recipe.linear_attention
    head_dim = t.hidden_size // t.num_attention_heads
    unit = head_dim // 64  # rotary frequencies: head_dim x 0.25 / 2 = 8 units, split 2:3:3 over t, h, w
    text_cfg = {
        **text_config_dict(recipe, tokenizer, mrope=False),
        "model_type": "qwen3_5_text",
        "head_dim": head_dim,
        "linear_num_key_heads": linear.key_heads,
        "linear_num_value_heads": linear.value_heads,
        "linear_key_head_dim": linear.head_dim,
        "linear_value_head_dim": linear.head_dim,
        "layer_types": ["full_attention" if (i + 1) % linear.full_attention_interval == 0 else "linear_attention"
                        for i in range(t.num_hidden_layers)],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "mrope_interleaved": True,
                            "mrope_section": [2 * unit, 3 * unit, 3 * unit], "partial_rotary_factor": 0.25},
    }
    return Qwen3_5Config(
        text_config=text_cfg,
        vision_config={
            "depth": recipe.vision_depth,
            "hidden_size": recipe.vision_hidden_size,
            "intermediate_size": recipe.vision_intermediate_size,
            "num_heads": recipe.vision_heads,
            "patch_size": QWEN3_VL_PATCH,
            "out_hidden_size": t.hidden_size,
            "num_position_embeddings": 256,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=t.tie_word_embeddings,
        architectures=["Qwen3_5ForConditionalGeneration"],
    )


# LLaVA-OneVision at fixture size: 64-pixel SigLIP tiles of 16-pixel patches (16 tokens a tile)
# and an any-resolution grid of up to 2x2 tiles.
LLAVA_TILE = 64
LLAVA_PATCH = 16
LLAVA_GRID_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]

# Qwen2-VL image budget: 112x112 to 224x224 pixels, i.e. 16 to 64 image tokens (28-pixel units).
QWEN_MIN_PIXELS = 112 * 112
QWEN_MAX_PIXELS = 224 * 224
# Qwen3-VL's: 128x128 to 256x256 pixels, the same 16 to 64 image tokens (32-pixel units).
QWEN3_MIN_PIXELS = 128 * 128
QWEN3_MAX_PIXELS = 256 * 256


def make_processor(recipe: FixtureRecipe, tokenizer, *, max_pixels: int | None = None):
    """The family's real processor (image processor + tokenizer + chat template); `max_pixels`
    caps Qwen images (None: the fixtures' 224x224, Qwen3-VL's 256x256; the scene testbed model
    takes its 280x280 whole)."""
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if recipe.family in ("qwen2_vl", "qwen2_5_vl"):
        size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": max_pixels or QWEN_MAX_PIXELS}
        processor_cls = Qwen2VLProcessor if recipe.family == "qwen2_vl" else Qwen2_5_VLProcessor
        return processor_cls(
            image_processor=Qwen2VLImageProcessor(size=size),
            video_processor=Qwen2VLVideoProcessor(size=size),
            tokenizer=tokenizer,
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )
    # Qwen3-VL and Qwen3.5 (whose hub files name Qwen3-VL's processor): Qwen2-VL's image processor with
    # 16-pixel patches, mean/std 0.5; Qwen3-VL's instruct template (Qwen3.5's own adds thinking markers after
    # the assistant turn's start, not reproduced: the fixture answers with no reasoning span)
    if recipe.family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):
        size = {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": max_pixels or QWEN3_MAX_PIXELS}
        pixels = {"patch_size": QWEN3_VL_PATCH, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": size}
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixels),
            video_processor=Qwen3VLVideoProcessor(**pixels),
            tokenizer=tokenizer,
            chat_template=QWEN3_VL_CHAT_TEMPLATE,
        )
    tile = {"height": LLAVA_TILE, "width": LLAVA_TILE}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=tile, crop_size=tile, image_grid_pinpoints=LLAVA_GRID_PINPOINTS
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=tile),
        tokenizer=tokenizer,
        num_image_tokens=(LLAVA_TILE // LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
