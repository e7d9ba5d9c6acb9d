"""The calibration job's typed configuration, parsed once (CLI flags and YAML recipes map onto it)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from tlq_vllm.calibrate.methods import get_method
from tlq_vllm.calibrate.schemes import get_scheme
from tlq_vllm.paths import user_folder

GRANULARITIES = ("linear", "layer")
COMPUTE_DTYPES = ("auto", "model", "float32")  # --compute-dtype
IMPORTANCE_DTYPES = ("compute", "float32")  # --importance-dtype
DEFAULT_MODEL = "toyvlm"


class ConfigError(ValueError):
    """An invalid option or recipe: the message names the value and what is allowed."""


@dataclass
class CalibrationConfig:
    """Everything one calibration run depends on. Defaults are TLQ's documented defaults."""

    model: str = DEFAULT_MODEL  # HF id, local dir, "toyvlm" (the trained toy VLM) or "fixture:<name>"
    data: str = "easy-vqa"  # "easy-vqa", a .jsonl/.json/.parquet/.arrow file, a save_to_disk dir, a dir of files
    scheme: str = "W4A16"
    method: str = "tlq"
    output: str | None = None  # default: out/<model>-<method>-<scheme>
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    seed: int = 0
    num_samples: int = 64
    max_seq_len: int = 2048
    max_pixels: int | None = None
    image_root: str | None = None  # relative image paths resolve here (default: the data file's directory)
    image_column: str | None = None  # the record field / dataset column with the image(s); None: image, images
    question_column: str | None = None  # None: question, prompt, query (or LLaVA conversations)
    answer_column: str | None = None  # None: answer, answers, caption (none: the FP model's greedy answer)
    # TLQ knobs (docs/method.md)
    importance_granularity: str = "linear"
    beta: float = 0.5
    clip_percentile: float = 99.5
    rho: float = 0.5
    modality_floor: float = 0.1
    exposure: bool = True
    modality_level: bool = False  # ablation: a token's importance = its modality's mean (per layer, linear)
    asymmetric_target: bool = False  # minimise ||W_hat x~ - W x||^2 (quantized-path input, FP-path target)
    # How kept tokens' importance becomes weights (tokensets.WeightShaping; all off by default until
    # the testbed, issue 14, gives validation numbers)
    importance_power: float = 1.0  # w = I ** power
    weight_shrinkage: float = 0.0  # w = (1 - lam) w + lam
    per_sample_weights: bool = False  # every sample's kept tokens carry the same total weight
    modality_weight_floor: float = 0.0  # each sample's vision / text weight >= this x their token share
    # SmoothQuant migration strength for A8 schemes: method "smoothquant" = SmoothQuant + RTN
    # (alpha 0.5 unless given); with another method, smoothing first, then that method.
    smoothquant_alpha: float | None = None
    # solver
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False
    hessian_dtype: str = "float32"  # "float64": more precise Hessian sums at 2x memory (any rank count: same bits)
    # dtype of the block forwards: "auto" float32 on CPUs without bf16/fp16 instructions, else the
    # model's (streaming.compute_dtype); "model" or "float32" to choose
    compute_dtype: str = "auto"
    # dtype of the importance pass's block-wise backward: "compute" = the layer forwards' (bf16 where they
    # compute in bf16: 1.6x faster at 2B width on an AVX-512 BF16 CPU, docs/method.md), or "float32"
    importance_dtype: str = "compute"
    # model loading and what to quantize
    quantize_vision: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # run control
    overwrite: bool = False
    resume: bool = False
    log_json: str | None = None
    progress: bool = True
    # distributed (torchrun): a collective that waits longer than this (a dead rank) fails the run
    collective_timeout: float = 600.0

    def validate(self) -> CalibrationConfig:
        """This config checked (one ConfigError naming the bad value) and completed: the scheme's
        canonical name, the method's SmoothQuant strength where none is given. Returns a new config;
        this one is left as it was."""
        try:
            scheme = get_scheme(self.scheme)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            method = get_method(self.method)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.importance_granularity not in GRANULARITIES:
            raise ConfigError(
                f"unknown importance granularity {self.importance_granularity!r}; choose {' or '.join(GRANULARITIES)}"
            )
        checks = [
            (0 <= self.beta <= 1, f"beta must be in [0, 1], got {self.beta}"),
            (0 < self.rho <= 1, f"rho must be in (0, 1], got {self.rho}"),
            (0 <= self.modality_floor <= 1, f"modality floor must be in [0, 1], got {self.modality_floor}"),
            (50 <= self.clip_percentile <= 100, f"clip percentile must be in [50, 100], got {self.clip_percentile}"),
            (0 <= self.importance_power <= 1, f"--importance-power must be in [0, 1], got {self.importance_power}"),
            (0 <= self.weight_shrinkage <= 1, f"--weight-shrinkage must be in [0, 1], got {self.weight_shrinkage}"),
            (0 <= self.modality_weight_floor <= 1,
             f"--modality-weight-floor must be in [0, 1], got {self.modality_weight_floor}"),
            (self.num_samples >= 1, f"--num-samples must be at least 1, got {self.num_samples}"),
            (self.max_seq_len >= 16, f"--max-seq-len must be at least 16, got {self.max_seq_len}"),
            (self.damp > 0, f"--damp must be positive, got {self.damp}"),
        ]
        checks.append((self.hessian_dtype in ("float32", "float64"),
                       f"--hessian-dtype must be float32 or float64, got {self.hessian_dtype!r}"))
        checks.append((self.compute_dtype in COMPUTE_DTYPES,
                       f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"))
        checks.append((self.importance_dtype in IMPORTANCE_DTYPES,
                       f"--importance-dtype must be one of {', '.join(IMPORTANCE_DTYPES)}, "
                       f"got {self.importance_dtype!r}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        alpha = method.smoothing_alpha(self.smoothquant_alpha)
        if alpha is not None:
            if not scheme.quantizes_activations:
                raise ConfigError(
                    f"SmoothQuant moves activation outliers into weights; it needs an A8 scheme (W8A8, W4A8), "
                    f"not {scheme.name}"
                )
            if not 0 <= alpha <= 1:
                raise ConfigError(f"--smoothquant-alpha must be in [0, 1], got {alpha}")
        return replace(self, scheme=scheme.name, smoothquant_alpha=alpha)

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        name = self.model.split(":", 1)[-1].rstrip("/").split("/")[-1]
        return Path("out") / f"{name}-{self.method}-{self.scheme.lower()}"

    def fingerprint(self) -> str:
        """A hash of everything that changes the result (not run control), for resume and provenance."""
        ignore = {"output", "overwrite", "resume", "log_json", "progress", "collective_timeout"}
        payload = {k: v for k, v in asdict(self).items() if k not in ignore}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def knobs(self) -> dict:
        return asdict(self)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in user_folder("calibrate").glob("*.yaml"))


def recipe_path(name: str | Path) -> Path:
    """A recipe file: a path, or the name of one in the calibrate/ folder (the checkout's or the wheel's)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = user_folder("calibrate") / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file() and path.parent == Path("."):
        return shipped
    raise ConfigError(f"recipe {name} not found; give a .yaml path or one of {', '.join(available_recipes())}")


def load_recipe(path: str | Path) -> dict:
    """A YAML recipe (a path or a shipped recipe's name): a mapping of CalibrationConfig fields (dashes or
    underscores)."""
    path = recipe_path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of options")
    known = {f.name for f in fields(CalibrationConfig)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"recipe {path}: unknown option {key!r}; known: {', '.join(sorted(known))}")
        values[name] = value
    return values
