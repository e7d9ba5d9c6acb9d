"""Layer streaming: the model never has to fit on the calibration device.

The catch stage (`catch_decoder_inputs`, one `catch_layer_inputs` per sample) runs each sample
through everything before the first decoder layer (vision tower, projector, embedding merge, M-RoPE
position embeddings, attention mask) and records the layer-0 hidden states and keyword arguments.
Every later stage replays decoder layers one at a time from those records: `run_layer` moves one
layer to the device, pushes each sample through, and brings the outputs back to CPU. This one
mechanism serves the importance pass (forward, then block-wise backward), the layer-wise
calibration and the memory bound.

Some families add features to the residual stream between decoder layers (Qwen3-VL's deepstack:
vision features at the image tokens after layers 0-2). They are arguments of the text model's
forward, not of the layers, so the catcher records them too (`ResidualInjection`, named by the
adapter's `residual_injections`) and every replay adds them where the model does (`after_layer`,
called by `run_layer`). Without injections the replay is the layers alone, bit for bit as before.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tlq_vllm.models.adapters import ResidualInjectionArgs


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed has been recorded."""


@dataclass
class ResidualInjection:
    """What the model adds to one sample's residual stream after its first decoder layers:
    values[l] ([n, H]) at the n positions of the [1, T] bool mask, after layer l."""

    positions: torch.Tensor
    values: list[torch.Tensor]


@dataclass
class LayerInputs:
    """What decoder layer 0 receives for one sample: hidden states [1, T, H] and its kwargs, and
    what is added to the stream after later layers (None: nothing)."""

    hidden: torch.Tensor
    kwargs: dict
    injection: ResidualInjection | None = None


def after_layer(index: int, hidden: torch.Tensor, injection: ResidualInjection | None) -> torch.Tensor:
    """Decoder layer `index`'s output as the next layer receives it: with the sample's injection
    for that layer added at its positions (the text model's own ops: a copy, an add in the hidden
    dtype), or unchanged. The add is constant in `hidden`, so gradients pass through it as they are."""
    if injection is None or index >= len(injection.values):
        return hidden
    mask = injection.positions.to(hidden.device)
    hidden = hidden.clone()
    hidden[mask, :] = hidden[mask, :] + injection.values[index].to(hidden.device, hidden.dtype)
    return hidden


def to_device(value, device, float_dtype: torch.dtype | None = None):
    """Moves tensors (also inside tuples/lists/dicts) to `device`; leaves everything else.

    float_dtype: floating tensors of a narrower dtype are also cast to it (a block's rotary cos/sin
    and masks for a block computing in float32); wider ones, such as a vision block's float32
    rotary embedding in a bf16 model, keep theirs."""
    if isinstance(value, torch.Tensor):
        if float_dtype is not None and value.is_floating_point() and value.itemsize < float_dtype.itemsize:
            return value.to(device, float_dtype)
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device, float_dtype) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, float_dtype) for k, v in value.items()}
    return value


def parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def compute_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the calibration's block forwards compute in, for a model held in `dtype`.

    On an x86 CPU without bf16 (fp16) dot-product instructions, as on AVX2-only machines, torch
    emulates bf16 GEMMs: a 2B-width down_proj on 322 tokens took 1.05 s in bf16 and 0.19 s in float32
    (AMD EPYC AVX2, 1 thread, 2026-12-02). There each block computes in float32 on its bf16 values
    (the cast is exact), and what leaves the block is rounded back to `dtype`: the hidden states
    passed to the next block and the inputs a linear's statistics are taken from, as the real bf16
    path has them. Inside a block the intermediate values are then not rounded to bf16 after each
    op; that is the only difference. Elsewhere (GPUs, CPUs with AVX512_BF16 or AMX) the model's
    dtype."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    if dtype == torch.bfloat16:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        native = torch.cpu._is_amx_fp16_supported()
    return dtype if native else torch.float32


def resolve_compute_dtype(choice: str, device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """--compute-dtype (config.COMPUTE_DTYPES) for a model held in `dtype` on `device`."""
    return {"auto": compute_dtype(device, dtype), "model": dtype, "float32": torch.float32}[choice]


def forward_to_first_layer(
    model, layers: torch.nn.ModuleList, sample_inputs: dict, *, grad: bool = False, more_hooks=()
) -> tuple[torch.Tensor, dict]:
    """Runs `model` on one sample and stops as decoder layer 0 is entered; returns that call's
    hidden states and keyword arguments (as given: on the run's device, in the graph if grad).

    more_hooks: (module, forward pre-hook with kwargs) pairs active during the same forward (the
    vision-block recorders). The model's own forward builds everything the decoder needs, so
    nothing model-specific (M-RoPE, image merge) is re-implemented here.
    """
    caught: dict = {}

    def stop(_module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs["hidden_states"]
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "hidden_states")}
        raise _StopForward

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in more_hooks]
    handles.append(layers[0].register_forward_pre_hook(stop, with_kwargs=True))
    try:
        with torch.enable_grad() if grad else torch.no_grad(), contextlib.suppress(_StopForward):
            model(**sample_inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if "hidden" not in caught:
        raise RuntimeError("the model's forward never reached its first decoder layer")
    return caught["hidden"], caught["kwargs"]


def catch_layer_inputs(model, layers: torch.nn.ModuleList, sample_inputs: dict,
                       injection_args: ResidualInjectionArgs | None = None) -> LayerInputs:
    """Decoder layer 0's inputs for one sample, on CPU, replayable with `layer_forward`.

    injection_args (the adapter's `residual_injections`): where the model receives what it adds
    after later layers; a pre-hook on that module records it during the same forward."""
    more_hooks, received = [], {}
    if injection_args is not None:
        def record(_module, _args, kwargs):
            received.update(positions=kwargs.get(injection_args.positions), values=kwargs.get(injection_args.values))

        more_hooks.append((model.get_submodule(injection_args.module), record))
    hidden, kwargs = forward_to_first_layer(model, layers, sample_inputs, more_hooks=more_hooks)
    kwargs = to_device(kwargs, "cpu")
    kwargs["use_cache"] = False
    injection = None
    if received.get("positions") is not None and received.get("values"):  # a sample without an image has none
        injection = ResidualInjection(received["positions"].detach().to("cpu"),
                                      [v.detach().to("cpu") for v in received["values"]])
    return LayerInputs(hidden.detach().to("cpu"), kwargs, injection)


def catch_decoder_inputs(model, adapter, samples: list, device, *, progress: bool = False) -> list[LayerInputs]:
    """The catch stage: every sample's decoder layer-0 inputs (CPU), the model up to layer 0 on `device`."""
    layers = adapter.layers(model)
    with pre_decoder_on_device(model, adapter.decoder_layers, device):
        return [catch_layer_inputs(model, layers, {k: v.to(device) for k, v in sample.inputs.items()},
                                   adapter.residual_injections)
                for sample in tqdm(samples, desc="catch layer-0 inputs", disable=not progress, leave=False)]


def catch_layer_inputs_with_graph(model, layers: torch.nn.ModuleList, sample_inputs: dict) -> torch.Tensor:
    """Like catch_layer_inputs, but with autograd on (pixels require grad) and only the hidden
    states returned, still attached to the graph through the vision tower."""
    inputs = dict(sample_inputs)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].detach().requires_grad_(True)
    return forward_to_first_layer(model, layers, inputs, grad=True)[0]


def catch_block_kwargs(model, blocks: torch.nn.ModuleList, layers: torch.nn.ModuleList,
                       sample_inputs: dict) -> tuple[torch.Tensor, list[dict]]:
    """Runs one sample until decoder layer 0, recording the vision blocks' inputs: block 0's
    hidden states and every block's keyword arguments (they differ per block, e.g. Qwen2.5-VL's
    window vs full attention), all on CPU."""
    first: dict = {}
    per_block: list[dict] = [{} for _ in blocks]

    def record(index):
        def hook(module, args, kwargs):
            if index == 0:
                first["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().to("cpu")
            # positional arguments after the hidden states (SigLIP passes attention_mask so) by name
            names = list(inspect.signature(module.forward).parameters)[1:]
            named = dict(zip(names, args[1:], strict=False))
            per_block[index] = to_device({**named, **{k: v for k, v in kwargs.items() if k != "hidden_states"}}, "cpu")
        return hook

    forward_to_first_layer(model, layers, sample_inputs, more_hooks=[(b, record(i)) for i, b in enumerate(blocks)])
    if "hidden" not in first:
        raise RuntimeError("the sample never reached the vision blocks (no image in it?)")
    return first["hidden"], per_block


def layer_forward(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on one sample; transformers 5 layers return the hidden states tensor."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None, *,
              write_back: bool = True) -> Iterator[torch.nn.Module]:
    """Moves `module` to `device` for the duration of the block and back to CPU after it.

    dtype: its floating parameters and buffers of a narrower dtype are also widened to it for the
    duration (compute_dtype) and narrowed back after, into their own memory (a loaded weight's
    pages of the checkpoint's memory map, which stay resident once read: a new tensor would hold
    the layer twice). The round trip is exact, so weights set inside the block to values of their
    own dtype come back as set.

    write_back=False, for a pass that only reads the module (the importance pass): its parameters
    get their own CPU tensors back untouched, instead of the device's or the widened values copied
    into them or into new ones. No copy back, and no page of a memory-mapped weight written: a
    written page becomes the process's own copy, so a read-only pass that wrote its values back
    would leave every layer it visited in RSS a second time. Buffers (rotary tables) come back as
    with write_back."""
    params = list(module.parameters())
    kept = [p.data for p in params] if not write_back else []
    module.to(device)
    tensors = [t for t in [*module.parameters(), *module.buffers()]
               if dtype is not None and t.is_floating_point() and t.itemsize < dtype.itemsize]
    own = [t.data for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield module
    finally:
        if not write_back:  # the originals, untouched
            for p, original in zip(params, kept, strict=True):
                p.data = original
        for t, narrow in zip(tensors, own, strict=True):
            if write_back or not isinstance(t, torch.nn.Parameter):
                t.data = narrow.copy_(t.data)
        module.to("cpu")


@contextlib.contextmanager
def pre_decoder_on_device(model: torch.nn.Module, decoder_prefix: str, device) -> Iterator[None]:
    """Moves everything but the decoder layers (vision tower, projector, embeddings, rotary
    buffers) to `device` for a catcher; the decoder layers stay on CPU (catchers stop before them).
    A catcher only reads them: afterwards each gets its own CPU tensor back (no copy of the vision
    tower, embeddings and lm_head made on the host)."""
    if torch.device(device).type == "cpu":
        yield
        return
    prefix = decoder_prefix + "."
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(prefix)]
    kept = [t.data for t in tensors]
    for t in tensors:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, original in zip(tensors, kept, strict=True):
            t.data = original


def run_layer(
    layer: torch.nn.Module,
    hiddens: list[torch.Tensor],
    kwargs: list[dict],
    device: torch.device | str,
    injections: list[ResidualInjection | None] | None = None,
    index: int = 0,
) -> list[torch.Tensor]:
    """Pushes every sample's hidden states through `layer` on `device`; outputs come back to CPU in
    the hidden states' dtype (the layer may compute in a wider one: compute_dtype).

    injections (per sample) and index (the layer's place in the stack): what `after_layer` adds
    to each output, so that the outputs are the next layer's inputs."""
    outputs = []
    dtype = parameter_dtype(layer)
    with torch.no_grad():
        for s, (hidden, kw) in enumerate(zip(hiddens, kwargs, strict=True)):
            out = layer_forward(layer, hidden.to(device, dtype), to_device(kw, device, dtype)).to(hidden.dtype)
            if injections is not None:
                out = after_layer(index, out, injections[s])
            outputs.append(out.to("cpu"))
    return outputs


def capture_module_inputs(layer: torch.nn.Module, module_name: str, hidden: torch.Tensor, kwargs: dict) -> tuple:
    """Runs `layer` until its submodule `module_name` is called and returns that call's positional
    arguments (detached, in the dtype the layer computes in). The forward stops right there: the
    rest of the layer is not computed."""
    caught: dict = {}

    def hook(_module, args):
        caught["args"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        raise _StopForward

    handle = layer.get_submodule(module_name).register_forward_pre_hook(hook)
    dtype = parameter_dtype(layer)
    try:
        with torch.no_grad(), contextlib.suppress(_StopForward):
            layer_forward(layer, hidden.to(dtype), to_device(kwargs, hidden.device, dtype))
    finally:
        handle.remove()
    return caught["args"]


def capture_linear_inputs(
    layer: torch.nn.Module,
    linear_names: tuple[str, ...],
    hidden: torch.Tensor,
    kwargs: dict,
) -> torch.Tensor:
    """Runs `layer` until the first of `linear_names` and returns its input [T, in], in the dtype
    of `hidden` (the model's, as the real path's linear receives it; the layer may compute in a
    wider one: compute_dtype).

    The linears of one group share their input, so one capture serves the group. The forward
    stops right there: the rest of the layer is not computed.
    """
    x = capture_module_inputs(layer, linear_names[0], hidden, kwargs)[0].to(hidden.dtype)
    return x.reshape(-1, x.shape[-1])  # [1, T, in] -> [T, in]
