"""The calibration methods, stated once: what each needs and how it weights the tokens it fits.

Every method runs in the same engine (streaming, exposure, solver, export), so comparisons are fair;
they differ only in the facts below. The pipeline, the vision stage, the planner and the CLI ask a
`Method` for them and never compare method names: a new method or variant is one entry here.

- rtn: round-to-nearest on each group's scale; needs no data (unless SmoothQuant is composed in).
- gptq: GPTQ on the plain Hessian of all tokens (uniform weights).
- mbq: GPTQ with one weight per modality per layer, r_l = mean|g| vision / mean|g| answer (MBQ).
- tlq: GPTQ on the Hessian of a token-level calibration set weighted by gradient importance (TLQ).
- smoothquant: SmoothQuant migration folded in, then RTN (A8 schemes).
"""

from __future__ import annotations

from dataclasses import dataclass

# How a method finds a linear's integers (layerwise.SolverOptions.solver).
GPTQ = "gptq"
RTN = "rtn"

# How a method weights the tokens of its Hessian.
UNIFORM = "uniform"  # every token, weight 1
MODALITY = "modality"  # one weight per modality per layer, from gradient ratios (MBQ)
TOKEN = "token"  # per-token importance, integrated over depth, and a token-level set (TLQ)


@dataclass(frozen=True)
class Method:
    name: str
    solver: str  # GPTQ or RTN
    token_weights: str = UNIFORM
    smoothquant_alpha: float | None = None  # the migration strength it implies (None: no smoothing)

    @property
    def needs_gradients(self) -> bool:
        """Whether the block-wise backward pass (gradient importance) runs."""
        return self.token_weights != UNIFORM

    def smoothing_alpha(self, requested: float | None) -> float | None:
        """The SmoothQuant strength a run uses: --smoothquant-alpha when given, else the method's own."""
        return self.smoothquant_alpha if requested is None else requested

    def needs_data(self, smoothquant_alpha: float | None) -> bool:
        """Whether calibration samples are needed at all (RTN alone needs only the weights);
        smoothquant_alpha is the requested strength (None: the method's own)."""
        return self.solver != RTN or self.needs_gradients or self.smoothing_alpha(smoothquant_alpha) is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rtn", solver=RTN),
        Method("gptq", solver=GPTQ),
        Method("mbq", solver=GPTQ, token_weights=MODALITY),
        Method("tlq", solver=GPTQ, token_weights=TOKEN),
        Method("smoothquant", solver=RTN, smoothquant_alpha=0.5),
    )
}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called `name`; ValueError naming the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
