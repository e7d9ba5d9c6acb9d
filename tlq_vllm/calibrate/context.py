"""The run context: what every stage of a calibration run reads, built once by `pipeline.run`.

`CalibrationConfig` is the user's words (flags, recipes); it stops at `run()`. The stages (data ->
catch -> token sets -> layer-wise calibration -> export) read this context instead: the loaded model
and its adapter, the scheme and method objects, the solver's and the token sets' options, the
device, the distributed state and the log. A stage never re-derives one of these from the config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from tlq_vllm.calibrate.config import CalibrationConfig
from tlq_vllm.calibrate.distributed import Dist
from tlq_vllm.calibrate.layerwise import SolverOptions
from tlq_vllm.calibrate.methods import Method, get_method
from tlq_vllm.calibrate.schemes import Scheme, get_scheme
from tlq_vllm.calibrate.streaming import parameter_dtype, resolve_compute_dtype
from tlq_vllm.calibrate.tokensets import WeightShaping
from tlq_vllm.models import ModelAdapter


@dataclass
class RunLog:
    """Progress lines for people, and the same events as JSON lines for machines (--log-json)."""

    path: str | None
    events: list[dict] = field(default_factory=list)
    quiet: bool = False  # ranks other than 0 of a distributed run

    def event(self, kind: str, message: str | None = None, **data) -> None:
        record = {"event": kind, "time": round(time.time(), 3), **data}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # allocator peak so far, for the planner
            record["device_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.events.append(record)
        if self.quiet:
            return
        if message:
            tqdm.write(message)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class TokenOptions:
    """How importance becomes token sets (docs/method.md): TLQ's knobs."""

    granularity: str  # "linear": each linear's output gradient; "layer": the residual stream's
    beta: float  # blend of local and depth-global importance
    clip_percentile: float  # importance clipped at this percentile of all tokens
    rho: float  # share of tokens kept by score
    modality_floor: float  # share of each sample's vision and text tokens always kept
    modality_level: bool  # ablation: every token of a modality gets the modality's mean score
    shaping: WeightShaping  # how kept tokens' scores become weights (default: as they are)


def solver_options(config: CalibrationConfig, method: Method) -> SolverOptions:
    return SolverOptions(
        solver=method.solver,
        block_size=config.block_size,
        damp=config.damp,
        act_order=config.act_order,
        clip_search=config.clip_search,
        hessian_dtype=getattr(torch, config.hessian_dtype),
    )


def token_options(config: CalibrationConfig) -> TokenOptions:
    return TokenOptions(
        granularity=config.importance_granularity,
        beta=config.beta,
        clip_percentile=config.clip_percentile,
        rho=config.rho,
        modality_floor=config.modality_floor,
        modality_level=config.modality_level,
        shaping=WeightShaping(
            power=config.importance_power,
            shrinkage=config.weight_shrinkage,
            per_sample=config.per_sample_weights,
            modality_weight_floor=config.modality_weight_floor,
        ),
    )


def exposure_mode(config: CalibrationConfig) -> str:
    """layerwise.MODES: where each group's statistics come from (docs/method.md, exposure)."""
    if not config.exposure:
        return "fp"
    return "asymmetric" if config.asymmetric_target else "exposed"


def target_linears(adapter: ModelAdapter, num_experts: int = 0, kind: str | None = None) -> list[str]:
    """The decoder linears quantized in a layer, in execution order (num_experts: of a sparse MoE decoder,
    ModelAdapter.num_experts; kind: of a hybrid decoder's layer, ModelAdapter.kinds_of_layers)."""
    return [name for group in adapter.layer_groups(num_experts, kind) for name in group]


@dataclass
class RunContext:
    model: torch.nn.Module
    processor: object
    adapter: ModelAdapter
    groups: list[tuple[tuple[str, ...], ...]]  # each decoder layer's linear groups in execution order
    scheme: Scheme
    method: Method
    solver: SolverOptions
    tokens: TokenOptions
    mode: str  # layerwise.MODES
    smoothquant_alpha: float | None  # SmoothQuant before each layer's calibration (None: off)
    quantize_vision: bool
    device: torch.device
    dtype: torch.dtype  # the model's weights, as the checkpoint holds them
    compute_dtype: torch.dtype  # of the block forwards (--compute-dtype; streaming.compute_dtype)
    importance_dtype: torch.dtype  # of the importance pass's block-wise backward (--importance-dtype)
    dist: Dist
    log: RunLog
    progress: bool

    @classmethod
    def build(cls, config: CalibrationConfig, model, processor, adapter: ModelAdapter, device: torch.device,
              dist: Dist, log: RunLog) -> RunContext:
        """config must be validated (CalibrationConfig.validate)."""
        method = get_method(config.method)
        dtype = parameter_dtype(adapter.layers(model))
        forward_dtype = resolve_compute_dtype(config.compute_dtype, device, dtype)
        return cls(
            model=model,
            processor=processor,
            adapter=adapter,
            groups=adapter.decoder_layer_groups(model.config),
            scheme=get_scheme(config.scheme),
            method=method,
            solver=solver_options(config, method),
            tokens=token_options(config),
            mode=exposure_mode(config),
            smoothquant_alpha=config.smoothquant_alpha,
            quantize_vision=config.quantize_vision,
            device=device,
            dtype=dtype,
            compute_dtype=forward_dtype,
            importance_dtype=forward_dtype if config.importance_dtype == "compute" else torch.float32,
            dist=dist,
            log=log,
            progress=config.progress and dist.is_main,
        )

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.adapter.layers(self.model)

    @property
    def linear_names(self) -> list[list[str]]:
        """Each decoder layer's quantized linears."""
        return [[name for group in groups for name in group] for groups in self.groups]

    @property
    def token_set_names(self) -> list[list[str]]:
        """What the token-set stage builds sets for, per decoder layer (the linears; a MoE block for its experts)."""
        return [self.adapter.token_set_names(groups) for groups in self.groups]

    @property
    def needs_data(self) -> bool:
        return self.method.needs_data(self.smoothquant_alpha)
