"""One calibration run, stage by stage: load, data, catch, importance, layer-wise calibration, export.

Every stage streams: weights stay on CPU, one decoder layer at a time visits the calibration
device, per-sample activations live on CPU between layers. The output directory appears only
when everything is written (staging directory + rename); partial per-layer results live in the
cache directory so that `--resume` can continue an interrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shlex
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tlq_vllm import __version__
from tlq_vllm.calibrate.config import CalibrationConfig, ConfigError
from tlq_vllm.calibrate.context import RunContext, RunLog
from tlq_vllm.calibrate.data import (
    ROLE_VISION,
    DataError,
    Fields,
    build_sample,
    dataset_hash,
    load_records,
    open_image,
)
from tlq_vllm.calibrate.distributed import init_from_env
from tlq_vllm.calibrate.experts import linearize_experts
from tlq_vllm.calibrate.export import DiskFullError, write_checkpoint
from tlq_vllm.calibrate.hostmem import read_tensors, safetensors_files
from tlq_vllm.calibrate.layerwise import LinearResult, rtn_layer
from tlq_vllm.calibrate.methods import get_method
from tlq_vllm.calibrate.quantizer import dequantize
from tlq_vllm.calibrate.schemes import Scheme
from tlq_vllm.calibrate.smoothquant import fold_smoothing, smoothing_scales
from tlq_vllm.calibrate.stack import block_provenance, calibrate_stack
from tlq_vllm.calibrate.streaming import capture_linear_inputs, catch_decoder_inputs, to_device
from tlq_vllm.calibrate.tokensets import decoder_token_sets
from tlq_vllm.calibrate.vision import calibrate_vision, catch_through_quantized_vision
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.models.builtin import resolve_builtin
from tlq_vllm.paths import cache_root, python_command


class CalibrationError(RuntimeError):
    """A run that cannot go on; the message says why and what to try."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_model(name: str) -> str:
    """`toyvlm` and `fixture:<name>` are built-in (tlq_vllm.models.builtin); anything else is a
    local dir or a hub id."""
    try:
        return resolve_builtin(name) or name
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_model(model_ref: str, config: CalibrationConfig, *, weights_in_memory: bool = False):
    """Config first (cheap: the architecture check and shape checks need nothing else).

    weights_in_memory: read the safetensors weights into memory of their own (hostmem.read_tensors)
    instead of transformers' memory map, so that a run that drops each weight once it is quantized
    (RTN, which needs no forward pass) gives that memory back; the model is the same, bit for bit."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    local = Path(model_ref).is_dir()
    if not local and (model_ref.startswith((".", "/")) or Path(model_ref).exists()):
        raise ConfigError(f"model path {model_ref} is not a model directory")
    try:
        hf_config = AutoConfig.from_pretrained(model_ref, trust_remote_code=config.trust_remote_code)
    except OSError as err:
        where = "a local directory" if local else "found locally and could not be downloaded (offline?)"
        raise ConfigError(f"model {model_ref!r} is not {where}: {str(err).splitlines()[0]}") from None
    try:
        adapter = adapter_for_model_type(hf_config.model_type)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if local and not config.allow_pickle and not list(Path(model_ref).glob("*.safetensors")):
        raise ConfigError(
            f"model {model_ref} has no .safetensors weights; loading pickle (.bin) weights runs code "
            "from the file: pass --allow-pickle if you trust it"
        )
    files = safetensors_files(model_ref) if weights_in_memory else []
    if files and type(hf_config) in AutoModelForImageTextToText._model_mapping:  # not remote code, not pickle
        try:  # what from_pretrained(model_ref) reads besides the weights
            generation_config = GenerationConfig.from_pretrained(model_ref)
        except OSError:
            generation_config = None  # the model's default, from its config
        model = AutoModelForImageTextToText._model_mapping[type(hf_config)].from_pretrained(
            None, config=hf_config, state_dict=read_tensors(files), generation_config=generation_config, dtype="auto"
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            model_ref,
            dtype="auto",
            trust_remote_code=config.trust_remote_code,
            use_safetensors=None if config.allow_pickle else True,
        )
    model.eval()
    model.requires_grad_(False)
    if adapter.sparse_experts is not None:  # one linear per expert and projection, to hook, solve and export
        linearize_experts(model, adapter.layers(model), adapter.sparse_experts)
    processor = AutoProcessor.from_pretrained(model_ref, trust_remote_code=config.trust_remote_code)
    return model, processor, adapter


def check_shapes(layers, names: list[list[str]], scheme: Scheme) -> None:
    """Every target linear's input features (names[l]: layer l's) must divide into the scheme's groups."""
    for l, layer in enumerate(layers):
        for name in names[l]:
            in_features = layer.get_submodule(name).in_features
            if scheme.group_size and in_features % scheme.group_size:
                raise ConfigError(
                    f"layer {l} {name} has {in_features} input features, not divisible by {scheme.name}'s "
                    f"group size {scheme.group_size}; choose a per-channel scheme (W8A8) or another model"
                )


def peak_memory(device: torch.device) -> dict:
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"host_peak_rss_mib": round(rss_mib, 1)}
    if device.type == "cuda":
        out["device_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


class PartialRun:
    """Finished layers of an interrupted run, in the cache dir, keyed by the config fingerprint and the
    output directory: two runs of the same settings into different outputs (at the same time, or one
    resumed later) never share or delete each other's layers."""

    def __init__(self, config: CalibrationConfig, writer: bool = True):
        output = hashlib.sha256(str(config.output_dir().resolve()).encode()).hexdigest()[:8]
        self.dir = cache_root() / "runs" / f"{config.fingerprint()}-{output}"
        self.writer = writer  # one rank writes; all read (one machine, or a shared cache dir)
        if writer and not config.resume:
            shutil.rmtree(self.dir, ignore_errors=True)
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)

    def finished_layers(self) -> dict[int, dict[str, LinearResult]]:
        done = {}
        for meta_path in sorted(self.dir.glob("layer_*.json")):
            l = int(meta_path.stem.split("_")[1])
            tensors_path = meta_path.with_suffix(".safetensors")
            if not tensors_path.exists():
                continue
            meta = json.loads(meta_path.read_text())
            tensors = load_file(tensors_path)
            done[l] = {
                name: LinearResult(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], *meta[name]) for name in meta
            }
        return done

    def save_layer(self, l: int, results: dict[str, LinearResult]) -> None:
        if not self.writer:
            return
        tensors = {}
        for name, r in results.items():
            tensors[f"{name}.qweight"] = r.qweight.contiguous()
            tensors[f"{name}.scales"] = r.scales.contiguous()
        save_file(tensors, self.dir / f"layer_{l:03d}.safetensors")
        meta = {name: [r.error_rtn, r.error, r.fallback_rtn] for name, r in results.items()}
        tmp = self.dir / f"layer_{l:03d}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.dir / f"layer_{l:03d}.json")  # the .json marks the layer finished

    def remove(self) -> None:
        if self.writer:
            shutil.rmtree(self.dir, ignore_errors=True)


def check_output_free(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"output {out_dir} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(out_dir: Path, overwrite: bool):
    """Yields an empty staging directory beside `out_dir`; renames it into place on success and
    removes it on failure (a full disk included), so an output directory that exists is always complete."""
    check_output_free(out_dir, overwrite)
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{out_dir.name}.tlq-staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as err:
        raise ConfigError(f"cannot write the output directory {out_dir}: {err.strerror}") from None
    try:
        yield staging
        for path in staging.rglob("*"):  # transformers writes weights 0600; a model dir is shared like any other
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.chmod(0o755)
        if out_dir.exists():
            old = parent / f".{out_dir.name}.tlq-old-{os.getpid()}"
            os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    except DiskFullError as err:
        kept = "the previous checkpoint there is kept as it was" if out_dir.exists() else "nothing was written"
        raise CalibrationError(
            f"no space left on the device for {out_dir} ({err.strerror}) while writing the checkpoint; "
            f"{kept}: free some space there or choose another --output"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run(config: CalibrationConfig) -> Path:
    """Calibrates `config.model` and writes a compressed-tensors checkpoint; returns its path.

    The config stops here: the stages read the run context built from it once."""
    config = config.validate()
    started = time.time()
    device = resolve_device(config.device)
    dist = init_from_env(device.type, config.collective_timeout)
    if dist.world > 1 and device.type == "cuda" and device.index is None:  # one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    log = RunLog(config.log_json if dist.is_main else None, quiet=not dist.is_main)
    if config.log_json and dist.is_main:
        Path(config.log_json).unlink(missing_ok=True)
    torch.manual_seed(config.seed)
    out_dir = config.output_dir()
    check_output_free(out_dir, config.overwrite)  # on every rank, before any collective
    model_ref = resolve_model(config.model)

    with staged_output(out_dir, config.overwrite) if dist.is_main else contextlib.nullcontext() as staging:
        model, processor, adapter = load_model(
            model_ref, config, weights_in_memory=not get_method(config.method).needs_data(config.smoothquant_alpha))
        ctx = RunContext.build(config, model, processor, adapter, device, dist, log)
        check_shapes(ctx.layers, ctx.linear_names, ctx.scheme)
        if adapter.sparse_experts is not None and ctx.mode == "asymmetric":
            raise ConfigError(
                f"--asymmetric-target is not supported for {adapter.family}: an expert's tokens on the quantized "
                "path are not the ones the router sends it on the FP path, so there is no FP row to pair with each"
            )
        if ctx.quantize_vision and adapter.vision_quantization_unsupported:
            raise ConfigError(
                f"--quantize-vision is not supported for {adapter.family}: {adapter.vision_quantization_unsupported}"
            )
        log.event(
            "start",
            f"tlq: {ctx.method.name} {ctx.scheme.name} on {model_ref} ({len(ctx.layers)} decoder layers, "
            f"device {device}" + (f", layer forwards in {dtype_name(ctx.compute_dtype)}"
                                  if ctx.compute_dtype != ctx.dtype else "") + ")",
            method=ctx.method.name,
            scheme=ctx.scheme.name,
            model=model_ref,
        )
        partial = PartialRun(config, writer=dist.is_main)
        dist.barrier()  # rank 0 has cleared stale partial results before anyone reads them
        finished = partial.finished_layers() if config.resume else {}
        if finished:
            log.event("resume", f"resuming: layers {sorted(finished)} already calibrated", layers=sorted(finished))

        records, samples, provenance_extra = [], [], {}
        vision_results: dict[int, dict[str, LinearResult]] = {}
        try:
            if not ctx.needs_data:  # the model is exported, never run: each weight is dropped once quantized
                results = {l: rtn_layer(layer, ctx.linear_names[l], ctx.scheme, ctx.solver, keep_weights=False)
                           for l, layer in enumerate(tqdm(ctx.layers, desc="rtn", disable=not ctx.progress))}
                if ctx.quantize_vision:
                    vision_results = calibrate_vision(ctx, [], None)
            else:
                records, samples = prepare_samples(model, processor, config, log)
                results, vision_results, provenance_extra = calibrate_model(ctx, samples, partial, finished)
        except torch.OutOfMemoryError as err:
            raise CalibrationError(
                f"out of memory on {device} ({str(err).splitlines()[0]}); `--plan` predicts peaks; lower "
                "--num-samples, --max-seq-len or --max-pixels, or use --importance-granularity layer"
            ) from None

        memory = peak_memory(device)
        provenance = {
            "tlq_version": __version__,
            "method": ctx.method.name,
            "scheme": ctx.scheme.name,
            "options": config.knobs(),
            "fingerprint": config.fingerprint(),
            "compute_dtype": dtype_name(ctx.compute_dtype),  # what --compute-dtype resolved to
            "importance_dtype": dtype_name(ctx.importance_dtype),  # and --importance-dtype
            "model": model_ref,
            "calibration_set": {
                "source": config.data,
                "hash": dataset_hash(records) if records else None,
                "num_samples": len(samples),
                "num_tokens": sum(s.num_tokens for s in samples),
            },
            "seed": config.seed,
            "layers": [block_provenance(results[l]) for l in range(len(ctx.layers))],
            **provenance_extra,
            "memory": memory,
            "wall_time_s": round(time.time() - started, 2),
        }
        provenance["ranks"] = dist.world
        if dist.is_main:
            export(ctx, results, vision_results, model_ref, staging, provenance)
    dist.barrier()
    if dist.is_main:
        partial.remove()
        print_summary(results, provenance, out_dir, log)
    return out_dir


def prepare_samples(model, processor, config: CalibrationConfig, log: RunLog):
    fields = Fields(config.image_column, config.question_column, config.answer_column)
    records = load_records(config.data, num_samples=config.num_samples, seed=config.seed,
                           image_root=config.image_root, fields=fields)
    image_token_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    samples, too_long = [], 0
    for record in tqdm(records, desc="data", disable=not config.progress, leave=False):
        if record.answer is None:
            record.answer = greedy_answer(model, processor, record, config)
        sample = build_sample(record, processor, image_token_id, max_pixels=config.max_pixels)
        if sample.num_tokens > config.max_seq_len:
            too_long += 1
            continue
        samples.append(sample)
    if not samples:
        raise DataError(
            f"every sample is longer than --max-seq-len {config.max_seq_len}; raise it or lower --max-pixels"
        )
    tokens = sum(s.num_tokens for s in samples)
    log.event(
        "data",
        f"data: {len(samples)} samples, {tokens} tokens"
        + (f" ({too_long} longer than --max-seq-len skipped)" if too_long else ""),
        samples=len(samples),
        skipped=too_long,
        tokens=tokens,
        vision_tokens=sum(int((s.roles == ROLE_VISION).sum()) for s in samples),
    )
    return records, samples


def greedy_answer(model, processor, record, config: CalibrationConfig, max_new_tokens: int = 32) -> str:
    """The FP model's own greedy answer, the label for records that have none."""
    images = [open_image(p, record.source, config.max_pixels) for p in record.images]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": record.prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)



def calibrate_model(ctx: RunContext, all_samples: list, partial: PartialRun,
                    finished: dict[int, dict[str, LinearResult]]):
    """The stages after the data: catch layer-0 inputs -> token sets (importance for tlq/mbq) ->
    the vision tower (--quantize-vision) -> the decoder layers on the exposed path.

    With several ranks, this rank catches and pushes only its shard of the samples; importance is
    gathered so that integration and token selection see every token, exactly as one process.
    Returns the decoder's and the vision tower's results and the provenance the stages add."""
    samples = ctx.dist.shard(all_samples)
    caught = catch_decoder_inputs(ctx.model, ctx.adapter, samples, ctx.device, progress=ctx.progress)
    weighting = decoder_token_sets(ctx, caught, samples, [s.roles for s in all_samples])
    extra = dict(weighting.provenance)

    fp_caught = caught
    vision_results = {}
    if ctx.quantize_vision:
        vision_results = calibrate_vision(ctx, samples, weighting.decoder_input_grads, len(all_samples))
        extra["vision_layers"] = [block_provenance(vision_results[b]) for b in sorted(vision_results)]
        caught = catch_through_quantized_vision(ctx, samples, fp_caught)  # what the decoder sees now
    kwargs = [c.kwargs for c in caught]

    def smooth(l, layer, hiddens, kwargs, dtype):
        smooth_layer(ctx, ctx.groups[l], layer, hiddens, kwargs, dtype)

    results = calibrate_stack(
        ctx, ctx.layers, ctx.groups, [c.hidden for c in caught], [kwargs] * len(ctx.layers),
        weighting.sets, label="layer",
        fp_hiddens=[c.hidden for c in fp_caught] if ctx.mode != "exposed" else None,
        injections=[c.injection for c in caught], fp_injections=[c.injection for c in fp_caught],
        before_block=smooth if ctx.smoothquant_alpha is not None else None,
        finished=finished, apply_finished=lambda layer, done, dtype: apply_results(layer, done, ctx.scheme, dtype),
        save=partial.save_layer, experts=ctx.adapter.sparse_experts, drop_weights=True,
    )
    return results, vision_results, extra


def smooth_layer(ctx: RunContext, groups, layer, hiddens, kwargs, dtype: torch.dtype) -> None:
    """SmoothQuant on this layer's norm -> linear pairs (groups: the layer's), from the layer's
    (quantized-path) inputs; the smoothed weights are rounded to `dtype` (the model's)."""
    for norm_name, group_index in ctx.adapter.smooth_pairs:
        group = groups[group_index]
        linears = [layer.get_submodule(n) for n in group]
        absmax = None
        for hidden, kw in zip(hiddens, kwargs, strict=True):
            x = capture_linear_inputs(layer, group, hidden.to(ctx.device), to_device(kw, ctx.device))  # [T, in]
            m = x.float().abs().amax(dim=0)
            absmax = m if absmax is None else torch.maximum(absmax, m)
        s = smoothing_scales(ctx.dist.all_reduce_max(absmax), [lin.weight for lin in linears], ctx.smoothquant_alpha)
        fold_smoothing(layer.get_submodule(norm_name), linears, s, dtype, ctx.adapter.norm_weight_offset)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def apply_results(layer, results: dict[str, LinearResult], scheme: Scheme, dtype: torch.dtype) -> None:
    """Sets the layer's weights to the results' dequantized values, rounded to `dtype` (the
    model's) and held in the weight's own dtype and device."""
    for name, r in results.items():
        linear = layer.get_submodule(name)
        weight = linear.weight
        weight.data = dequantize(r.qweight, r.scales, scheme, dtype).to(weight.device, weight.dtype)


def export(ctx: RunContext, results, vision_results, model_ref, staging: Path, provenance: dict) -> None:
    adapter = ctx.adapter
    quantized = {
        f"{prefix}.{l}.{name}": r
        for prefix, per_index in ((adapter.decoder_layers, results), (adapter.vision_blocks, vision_results))
        for l, per_layer in per_index.items()
        for name, r in per_layer.items()
    }
    source_dir = Path(model_ref) if Path(model_ref).is_dir() else None
    if source_dir is None:
        from huggingface_hub import snapshot_download

        source_dir = Path(snapshot_download(model_ref, allow_patterns=["*.json", "*.jinja", "*.txt", "*.model"]))
    write_checkpoint(
        ctx.model,
        quantized,
        ctx.scheme,
        adapter,
        source_dir=source_dir,
        out_dir=staging,
        provenance=provenance,
        quantize_vision=bool(vision_results),
        release_integers=True,  # the run reads only the results' errors afterwards
    )


def serve_command(out_dir: Path) -> str:
    """The command that serves `out_dir`, as typed in a fresh shell here (run verbatim by a test)."""
    return f"{python_command()} -m tlq_vllm.serve {shlex.quote(str(out_dir))}"


def print_summary(results, provenance: dict, out_dir: Path, log: RunLog) -> None:
    rows = []
    for l in sorted(results):
        before = sum(r.error_rtn for r in results[l].values())
        after = sum(r.error for r in results[l].values())
        rows.append((l, before, after, after / before if before else float("nan")))
    lines = ["", f"{'layer':>5}  {'err RTN':>12}  {'err ' + provenance['method']:>12}  {'ratio':>6}"]
    lines += [f"{l:>5}  {b:>12.4g}  {a:>12.4g}  {r:>6.3f}" for l, b, a, r in rows]
    mem = provenance["memory"]
    num_samples = provenance["calibration_set"]["num_samples"]
    lines += [
        "",
        f"{provenance['method']} {provenance['scheme']}: {len(rows)} layers, {num_samples} "
        f"samples, {provenance['wall_time_s']:.1f}s, peak host RSS {mem['host_peak_rss_mib']:.0f} MiB"
        + (f", peak device {mem['device_peak_allocated_mib']:.0f} MiB" if "device_peak_allocated_mib" in mem else ""),
        f"checkpoint: {out_dir}",
        f"serve it:   {serve_command(out_dir)}",
    ]
    log.event("done", "\n".join(lines), output=str(out_dir), wall_time_s=provenance["wall_time_s"])
