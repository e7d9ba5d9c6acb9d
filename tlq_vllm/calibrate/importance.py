"""Token importance from gradients and its integration across depth (the token sets that use it:
tokensets.py).

Notation (docs/method.md): decoder layer l, sample s, token t, linear output y_t = W x_t, loss L_s
(cross-entropy over the answer tokens).

- `gradient_importance`: a_{l,j,t} = ||dL/dy_{l,j,t}||^2 for every decoder linear j (a
  diagonal-Fisher estimate of what an output error at token t costs), from a block-wise backward
  pass over the streamed layers: forward one layer at a time storing each layer's input, then
  backward one layer at a time in reverse, recomputing the layer from its stored input. No
  whole-model autograd graph exists; peak device memory is one layer. With granularity "layer",
  a_{l,t} = ||dL/dh_{l+1,t}||^2 of the residual stream, shared by the layer's linears.
- `integrate`: normalise by the mean over all calibration tokens, clip at a high percentile,
  blend local and depth-global importance with beta.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tlq_vllm.calibrate.data import ROLE_ANSWER, ROLE_PROMPT, ROLE_VISION
from tlq_vllm.calibrate.hostmem import page_out, release_free_heap
from tlq_vllm.calibrate.streaming import (
    LayerInputs,
    catch_layer_inputs_with_graph,
    layer_forward,
    on_device,
    run_layer,
    to_device,
)

# importance[layer][linear name] = one [T] float32 tensor per sample
Importance = list[dict[str, list[torch.Tensor]]]


# float32 elements of one vocabulary chunk's temporaries in answer_gradients (32 MiB each)
LOSS_CHUNK_ELEMENTS = 2**23


def answer_positions(roles: torch.Tensor) -> torch.Tensor:
    """The positions whose outputs predict an answer token: token t is predicted at t - 1."""
    targets = (roles == ROLE_ANSWER).nonzero().flatten()
    return targets[targets > 0] - 1


def answer_gradients(
    hiddens: list[torch.Tensor], final_norm: torch.nn.Module, lm_head: torch.nn.Module,
    roles: list[torch.Tensor], input_ids: list[torch.Tensor], device,
) -> tuple[list[float], list[torch.Tensor]]:
    """Each sample's answer loss L_s (mean cross-entropy of its answer tokens given everything
    before them) and dL_s/dh ([1, T, H] float32, CPU) at the last decoder layer's output h.

    final_norm must compute in float32. Only the positions that predict an answer token have a
    loss, so only they go through the norm and lm_head: every sample's at once, against a chunk of
    lm_head's rows at a time, in float32 from the model-dtype weight. No float32 copy of lm_head
    and no [T, V] logits exist (a 2B model's vocabulary: 151936 rows). The cross-entropy's gradient
    is written out, dL/dz = (softmax(z W^T) - onehot(y)) W / n_s: a first pass over the chunks
    finds each row's log-sum-exp, a second forms the gradient. A sample without answer tokens has
    loss 0 and gradient 0."""
    positions = [answer_positions(r) for r in roles]
    owner = torch.cat([torch.full((len(p),), s) for s, p in enumerate(positions)]).to(device)
    counts = torch.tensor([len(p) for p in positions], dtype=torch.float32, device=device)
    targets = torch.cat([ids[p + 1] for ids, p in zip(input_ids, positions, strict=True)]).to(device)
    h = torch.cat([hidden[0, p] for hidden, p in zip(hiddens, positions, strict=True)])
    h = h.to(device, torch.float32).requires_grad_(True)  # [N, H]: every sample's answer rows
    with torch.enable_grad():
        z = final_norm(h)
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    chunk = max(1, LOSS_CHUNK_ELEMENTS // max(len(h), weight.shape[1]))
    starts = range(0, weight.shape[0], chunk)

    def logits(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight[start:start + chunk].float()
        out = z.detach() @ w.T  # [N, chunk]
        return w, out if bias is None else out + bias[start:start + chunk].float()

    rows = torch.arange(len(h), device=device)
    with torch.no_grad():
        lse = torch.full((len(h),), -torch.inf, device=device)
        target_logit = torch.zeros(len(h), device=device)
        for start in starts:
            _, out = logits(start)
            lse = torch.logaddexp(lse, out.logsumexp(-1))
            mine = (targets >= start) & (targets < start + chunk)
            target_logit[mine] = out[rows[mine], targets[mine] - start]
        row_scale = (1 / counts[owner])[:, None]
        dz = torch.zeros_like(z)
        for start in starts:
            w, out = logits(start)
            p = (out - lse[:, None]).exp_()
            mine = (targets >= start) & (targets < start + chunk)
            p[rows[mine], targets[mine] - start] -= 1
            dz += (p * row_scale) @ w
    z.backward(dz)
    row_loss = (lse - target_logit).detach()
    losses = torch.zeros(len(roles), device=device).index_add_(0, owner, row_loss) / counts.clamp_min(1)
    grads = []
    offsets = [0, *torch.cumsum(counts.to("cpu", torch.int64), 0).tolist()]
    for s, (hidden, p) in enumerate(zip(hiddens, positions, strict=True)):
        grad = torch.zeros(hidden.shape, dtype=torch.float32)
        grad[0, p] = h.grad[offsets[s]:offsets[s + 1]].to("cpu")
        grads.append(grad)
    return [float(x) for x in losses], grads


def gradient_importance(
    layers: torch.nn.ModuleList,
    final_norm: torch.nn.Module,
    lm_head: torch.nn.Module,
    layer_names: list[list[str]],
    inputs: list[LayerInputs],
    roles: list[torch.Tensor],
    input_ids: list[torch.Tensor],
    *,
    device,
    granularity: str = "linear",
    compute_dtype: torch.dtype | None = None,
    backward_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> tuple[Importance, list[float], list[torch.Tensor]]:
    """Returns a[l][linear][s] = per-token squared output-gradient norms, each sample's loss, and
    each sample's dL/dh_0 (the gradient at the decoder's input, which the vision pass continues).

    The forward computes in compute_dtype (streaming.compute_dtype; default the layers'), the
    backward in backward_dtype on one layer at a time (a narrower layer widened in place; the
    pipeline passes --importance-dtype: the forwards' dtype by default). The loss gradient enters
    in float32 and the squared norms are summed in float32 whatever the backward's dtype; the
    returned dL/dh_0 is in backward_dtype. Parameters get no gradients. bf16 against float32
    (docs/method.md): per-token scores within 0.7% (relative L2) on a random-weight 2B-width model
    and within 7.3% on the trained toy VLM's last layer, rank correlation >= 0.998.
    """
    num_layers = len(layers)
    # Forward, storing each layer's input (CPU, model dtype): stored[l][s] = input of layer l, with
    # what the model adds after layer l - 1 (deepstack). That add is constant in h, so the backward
    # below passes dL/d(input of l + 1) to layer l's output unchanged.
    stored = [[x.hidden for x in inputs]]
    injections = [x.injection for x in inputs]
    for l, layer in enumerate(tqdm(layers, desc="importance: forward", disable=not progress, leave=False)):
        with on_device(layer, device, compute_dtype, write_back=False):
            stored.append(run_layer(layer, stored[-1], [x.kwargs for x in inputs], device, injections, l))
        release_free_heap()  # the widened copy's and the activations' pages

    importance: Importance = [{name: [] for name in names} for names in layer_names]
    with on_device(final_norm, device, torch.float32, write_back=False), on_device(lm_head, device, write_back=False):
        losses, grads = answer_gradients(stored[-1], final_norm, lm_head, roles, input_ids, device)
    page_out(lm_head.weight)  # read whole (151936 rows at 2B) and not again: its file pages leave RSS

    for l in tqdm(reversed(range(num_layers)), total=num_layers, desc="importance: backward",
                  disable=not progress, leave=False):
        layer = layers[l]
        captured: dict[str, torch.Tensor] = {}
        handles = []
        if granularity == "linear":
            for name in layer_names[l]:
                def keep_output_grad(_module, _args, output, name=name, store=captured):
                    output.register_hook(lambda grad, name=name: store.__setitem__(name, grad.detach()))

                handles.append(layer.get_submodule(name).register_forward_hook(keep_output_grad))
        try:
            with on_device(layer, device, backward_dtype, write_back=False):
                for s, x in enumerate(inputs):
                    grad_out = grads[s].to(device, backward_dtype)
                    # detach: for a float32 model, .to() returns the caller's own tensor, whose .grad
                    # would accumulate over calls (and which would be left requiring grad)
                    h_in = stored[l][s].to(device, backward_dtype).detach().requires_grad_(True)
                    out = layer_forward(layer, h_in, to_device(x.kwargs, device, backward_dtype))
                    out.backward(grad_out)
                    for name in layer_names[l]:
                        g = captured[name] if granularity == "linear" else grad_out
                        importance[l][name].append(g.reshape(-1, g.shape[-1]).float().pow(2).sum(-1).to("cpu"))
                    grads[s] = h_in.grad.detach().to("cpu")
                    captured.clear()
        finally:
            for handle in handles:
                handle.remove()
        del stored[l + 1]  # layer l's output: read by nothing below it
        for param in layer.parameters():  # read again only when the layer is calibrated, from the file
            page_out(param)
        release_free_heap()
    return importance, losses, grads


def vision_gradient_importance(
    model,
    blocks: torch.nn.ModuleList,
    decoder_layers: torch.nn.ModuleList,
    linear_names: list[str],
    samples_inputs: list[dict],
    decoder_input_grads: list[torch.Tensor],
    *,
    device,
    progress: bool = True,
) -> Importance:
    """a[b][linear][s] for the vision blocks: the block-wise backward continued into the vision tower.

    Per sample, the model runs up to decoder layer 0 with the graph kept (the pixels require
    grad; no parameter does), and dL/dh_0 from the decoder pass is pushed back through the
    embedding merge, projector and vision blocks; hooks read each vision linear's output
    gradient. The vision tower is small next to the decoder and is held whole on the device for
    this pass (it is not streamed block by block).
    """
    importance: Importance = [{name: [] for name in linear_names} for _ in blocks]
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for b, block in enumerate(blocks):
        for name in linear_names:
            def keep_output_grad(_module, _args, output, key=(b, name)):
                output.register_hook(lambda g: captured.__setitem__(key, g.detach()))

            handles.append(block.get_submodule(name).register_forward_hook(keep_output_grad))
    try:
        for s, inputs in enumerate(tqdm(samples_inputs, desc="importance: vision", disable=not progress, leave=False)):
            hidden = catch_layer_inputs_with_graph(model, decoder_layers, to_device(inputs, device))
            hidden.backward(decoder_input_grads[s].to(device, hidden.dtype))
            for b in range(len(blocks)):
                for name in linear_names:
                    g = captured[(b, name)]
                    importance[b][name].append(g.reshape(-1, g.shape[-1]).float().pow(2).sum(-1).to("cpu"))
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return importance


def integrate(importance: Importance, *, beta: float = 0.5, clip_percentile: float = 99.5) -> Importance:
    """I_{l,j,t} = (1 - beta) * a_hat_{l,j,t} + beta * mean_k a_hat_{k,j,t}.

    a_hat is a normalised by its mean over all calibration tokens of (l, j) and clipped at the
    given percentile of those tokens (gradient spikes would otherwise own the Hessian). The
    depth-global term averages the same linear role j over all layers k that have it (in a hybrid
    decoder, the layers of its kind; linears every layer has, such as the MLP's, over all).
    """
    normalised: Importance = []
    for per_linear in importance:
        layer_out = {}
        for name, per_sample in per_linear.items():
            flat = torch.cat(per_sample)
            a_hat = [a / flat.mean().clamp_min(1e-30) for a in per_sample]
            cap = torch.quantile(torch.cat(a_hat).double(), clip_percentile / 100).float()
            layer_out[name] = [a.clamp_max(cap) for a in a_hat]
        normalised.append(layer_out)
    holders = {name: [k for k, per in enumerate(normalised) if name in per] for per in normalised for name in per}
    result: Importance = []
    for per_linear in normalised:
        layer_out = {}
        for name, per_sample in per_linear.items():
            layers = holders[name]
            layer_out[name] = [
                (1 - beta) * a + beta * sum(normalised[k][name][s] for k in layers) / len(layers)
                for s, a in enumerate(per_sample)
            ]
        result.append(layer_out)
    return result


def mbq_ratios(raw: Importance, roles: list[torch.Tensor]) -> list[float]:
    """MBQ's modality balance per layer: r_l = mean|g| over vision tokens / mean|g| over answer
    tokens (|g| = the output-gradient norm, averaged over the layer's linears), clamped below by
    the median over layers, as in MBQ's public code."""
    ratios = []
    vision = torch.cat([r == ROLE_VISION for r in roles])
    answer = torch.cat([r == ROLE_ANSWER for r in roles])
    for per_linear in raw:
        g = torch.stack([torch.cat(v).sqrt() for v in per_linear.values()]).mean(0)
        ratios.append(float(g[vision].mean() / g[answer].mean().clamp_min(1e-30)) if vision.any() else 1.0)
    floor = float(torch.tensor(ratios).median())
    return [max(r, floor) for r in ratios]


def modality_average(importance: Importance, roles: list[torch.Tensor]) -> Importance:
    """The modality-level ablation: per (l, j), every token's score replaced by the mean score of its
    role (vision, prompt, answer) over all calibration tokens, so weights differ between modalities
    but not between the tokens of one modality (MBQ's granularity, with TLQ's gradients)."""
    flat_roles = torch.cat(roles)
    result: Importance = []
    for per_linear in importance:
        layer_out = {}
        for name, per_sample in per_linear.items():
            flat = torch.cat(per_sample)
            means = torch.zeros_like(flat)
            for role in (ROLE_PROMPT, ROLE_VISION, ROLE_ANSWER):
                mask = flat_roles == role
                if mask.any():
                    means[mask] = flat[mask].mean()
            layer_out[name] = list(means.split([s.numel() for s in per_sample]))
        result.append(layer_out)
    return result


def modality_means(importance: Importance, roles: list[torch.Tensor]) -> list[dict[str, float]]:
    """Per layer: mean importance of vision, prompt and answer tokens (the paper's premise)."""
    masks = {
        "vision": torch.cat([r == ROLE_VISION for r in roles]),
        "prompt": torch.cat([r == ROLE_PROMPT for r in roles]),
        "answer": torch.cat([r == ROLE_ANSWER for r in roles]),
    }
    out = []
    for per_linear in importance:
        values = torch.stack([torch.cat(v) for v in per_linear.values()]).mean(0)
        out.append({k: float(values[m].mean()) if m.any() else float("nan") for k, m in masks.items()})
    return out
