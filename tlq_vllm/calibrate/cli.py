"""`python -m tlq_vllm.calibrate`: a thin shim from flags (and a YAML recipe) to `run(config)`.

Precedence: CalibrationConfig defaults < --recipe values < flags given on the command line.
With no arguments it calibrates the embedded default (see README) into out/, replacing it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from dataclasses import fields

from tlq_vllm.calibrate.config import (
    COMPUTE_DTYPES,
    GRANULARITIES,
    IMPORTANCE_DTYPES,
    CalibrationConfig,
    ConfigError,
    available_recipes,
    load_recipe,
)
from tlq_vllm.calibrate.methods import METHOD_NAMES
from tlq_vllm.calibrate.schemes import SCHEMES
from tlq_vllm.paths import python_command

DEFAULTS = CalibrationConfig()


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS  # only flags the user typed reach the config, so recipes can fill the rest
    p = argparse.ArgumentParser(
        prog="python -m tlq_vllm.calibrate",
        description="TLQ post-training quantization calibration for vision-language models; "
        "writes a compressed-tensors checkpoint that vLLM serves.",
        argument_default=S,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DEFAULTS
    p.add_argument("--recipe", help="YAML file of options, or the name of a shipped recipe "
                   f"({', '.join(available_recipes())}); flags override it")
    io = p.add_argument_group("what to calibrate")
    io.add_argument(
        "--model", help=f"HF model id, local directory, toyvlm, testbed (toy VLM v2, scenes) or fixture:<name> "
                        f"(default {d.model}: the toy VLM)"
    )
    io.add_argument("--data", help="easy-vqa, scenes:calibration, a .jsonl, a LLaVA .json list, a datasets "
                    f"save_to_disk directory, .parquet or .arrow files, or a directory of them (default {d.data})")
    io.add_argument("--scheme", help=f"one of {', '.join(SCHEMES)} (default {d.scheme})")
    io.add_argument("--method", choices=METHOD_NAMES, help=f"calibration method (default {d.method})")
    io.add_argument("--output", "-o", help="output directory (default out/<model>-<method>-<scheme>)")
    io.add_argument("--device", help=f"auto, cpu, cuda, cuda:N (default {d.device})")
    io.add_argument("--seed", type=int, help=f"sample selection and everything random (default {d.seed})")
    data = p.add_argument_group("calibration data")
    data.add_argument("--num-samples", type=int, help=f"calibration samples (default {d.num_samples})")
    data.add_argument("--max-seq-len", type=int, help=f"skip longer samples (default {d.max_seq_len})")
    data.add_argument("--max-pixels", type=int, help="downscale larger images to this many pixels")
    data.add_argument("--image-root", help="directory that relative image paths resolve against "
                      "(default: the data file's directory)")
    data.add_argument("--image-column", help="field or column holding the image(s) (default: image, images)")
    data.add_argument("--question-column", help="field or column holding the question "
                      "(default: question, prompt, query, or LLaVA conversations)")
    data.add_argument("--answer-column", help="field or column holding the answer; none: the model's own "
                      "greedy answer (default: answer, answers, caption)")
    tlq = p.add_argument_group("TLQ (docs/method.md)")
    tlq.add_argument(
        "--importance-granularity",
        choices=GRANULARITIES,
        help=f"per-linear output gradients or the layer's residual stream (default {d.importance_granularity})",
    )
    tlq.add_argument("--beta", type=float, help=f"depth-global share of the importance (default {d.beta})")
    tlq.add_argument("--clip-percentile", type=float, help=f"importance clip percentile (default {d.clip_percentile})")
    tlq.add_argument("--rho", type=float, help=f"fraction of tokens kept per linear (default {d.rho})")
    tlq.add_argument(
        "--modality-floor",
        type=float,
        help=f"minimum share of each sample's vision and text tokens kept (default {d.modality_floor})",
    )
    tlq.add_argument(
        "--exposure",
        action=argparse.BooleanOptionalAction,
        help="statistics from the quantized path (default on; --no-exposure: FP path)",
    )
    tlq.add_argument(
        "--modality-level",
        action=argparse.BooleanOptionalAction,
        help="ablation: every token weighted by its modality's mean importance, not its own (default off)",
    )
    tlq.add_argument("--importance-power", type=float,
                     help=f"token weight = importance ** P, P in [0, 1]; 0: the token set unweighted "
                     f"(default {d.importance_power}: as is)")
    tlq.add_argument("--weight-shrinkage", type=float,
                     help=f"blend token weights with uniform ones: (1 - L) w + L (default {d.weight_shrinkage}: off)")
    tlq.add_argument("--per-sample-weights", action=argparse.BooleanOptionalAction,
                     help="every sample's tokens carry the same total weight (default off)")
    tlq.add_argument("--modality-weight-floor", type=float,
                     help="each sample's vision and text tokens carry at least F x their token share of its weight "
                     f"(default {d.modality_weight_floor}: off)")
    tlq.add_argument(
        "--asymmetric-target",
        action=argparse.BooleanOptionalAction,
        help="target the FP path's outputs from the quantized path's inputs (default off)",
    )
    tlq.add_argument(
        "--smoothquant-alpha",
        type=float,
        help="SmoothQuant migration strength for A8 schemes (method smoothquant: 0.5)",
    )
    solver = p.add_argument_group("solver")
    solver.add_argument("--block-size", type=int, help=f"GPTQ lazy-batch block (default {d.block_size})")
    solver.add_argument("--damp", type=float, help=f"relative Hessian damping (default {d.damp})")
    solver.add_argument("--act-order", action=argparse.BooleanOptionalAction, help="static act-order (default off)")
    solver.add_argument(
        "--clip-search",
        action=argparse.BooleanOptionalAction,
        help="weighted-MSE search of group clipping ratios (default off)",
    )
    solver.add_argument("--hessian-dtype", choices=("float32", "float64"),
                        help="Hessian accumulation dtype; float64 sums more precisely, 2x the memory (default float32)")
    solver.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                        help="dtype of the layer forwards: auto = float32 on CPUs without bf16 instructions "
                             "(AVX2-only: ~5x faster), else the model's (default auto)")
    solver.add_argument("--importance-dtype", choices=IMPORTANCE_DTYPES,
                        help="dtype of the importance pass's backward: compute = the layer forwards' "
                             "(bf16 where they run in bf16), or float32 (default compute)")
    model = p.add_argument_group("model loading")
    model.add_argument(
        "--quantize-vision", action=argparse.BooleanOptionalAction, help="also quantize the vision blocks"
    )
    model.add_argument(
        "--trust-remote-code", action=argparse.BooleanOptionalAction, help="run model code from the repo"
    )
    model.add_argument("--allow-pickle", action=argparse.BooleanOptionalAction, help="allow .bin (pickle) weights")
    ctl = p.add_argument_group("run control")
    ctl.add_argument("--overwrite", action=argparse.BooleanOptionalAction, help="replace a non-empty output dir")
    ctl.add_argument("--resume", action=argparse.BooleanOptionalAction, help="continue an interrupted run")
    ctl.add_argument("--log-json", help="write progress events as JSON lines to this file")
    ctl.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (default on)")
    planner = p.add_argument_group("memory planner (no weights loaded)")
    planner.add_argument("--plan", action="store_true",
                         help="print each stage's peak device/host memory per rank for these settings and exit; "
                         "--model may also be a config.json or a snapshot name from tlq_vllm/models/config_snapshots/")
    planner.add_argument("--device-mem", help="device memory per rank for --plan, e.g. 24GiB (RTX 3090)")
    planner.add_argument("--host-mem", help="host memory per node for --plan, e.g. 256GiB")
    dist = p.add_argument_group("several processes (docs/distributed.md)")
    dist.add_argument("--nproc", type=int, help="run data-parallel over N local processes (launches torchrun)")
    dist.add_argument("--collective-timeout", type=float,
                      help=f"seconds a rank waits for the others before failing (default {d.collective_timeout:.0f})")
    return p


def config_from_args(argv: list[str]) -> CalibrationConfig:
    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    if "recipe" in args:
        values.update(load_recipe(args.pop("recipe")))
    values.update(args)
    if not argv:  # the embedded default run: its own scratch output, replaced each time
        values["overwrite"] = True
    for planner_only in ("nproc", "plan", "device_mem", "host_mem"):
        values.pop(planner_only, None)
    known = {f.name for f in fields(CalibrationConfig)}
    return CalibrationConfig(**{k: v for k, v in values.items() if k in known})


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB', '512MiB', '1.5TiB' or a plain number of bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1, "": 1}
    lowered = text.strip().lower()
    number = lowered.rstrip("kmgtib")
    unit = lowered[len(number):]
    if unit not in units:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 24GiB, 24GB or 512MiB")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 24GiB, 24GB or 512MiB") from None


def command_with(argv: list[str], settings: dict) -> str:
    """This command line, typed in a fresh shell, with `settings` (flag -> value) replacing or adding flags."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in settings:
            skip = "=" not in arg
            continue
        kept.append(arg)
    kept += [token for flag, value in settings.items() for token in (flag, str(value))]
    return f"{python_command()} -m tlq_vllm.calibrate {shlex.join(kept)}"


def print_plan(args: dict, argv: list[str]) -> int:
    """`--plan`: the memory planner for the run these options describe (config.json only)."""
    from tlq_vllm.calibrate.planner import PlanError, format_plan, plan_from_path

    config = config_from_args([a for a in argv if a != "--plan"])
    try:
        result = plan_from_path(
            config.model,
            config,
            nproc=args.get("nproc", 1),
            device_mem_bytes=parse_bytes(args["device_mem"]) if args.get("device_mem") else None,
            host_mem_bytes=parse_bytes(args["host_mem"]) if args.get("host_mem") else None,
            device="cpu" if config.device == "cpu" else "cuda",  # auto: plan for the GPU a run would use
        )
    except PlanError as err:
        raise ConfigError(str(err)) from None
    print(format_plan(result))
    for suggestion in result.suggestions:
        if suggestion.settings:
            print(f"plan it:  {command_with(argv, suggestion.settings)}")
    return 0 if result.fits is not False else 1


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: the same command under torchrun (one machine, N processes), without --nproc."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tlq_vllm.calibrate", *rest]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    from tlq_vllm.calibrate.data import DataError
    from tlq_vllm.calibrate.distributed import shutdown
    from tlq_vllm.calibrate.pipeline import CalibrationError, run

    argv = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK")
    prefix = f"error (rank {rank}): " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else "error: "
    signal.signal(signal.SIGTERM, _raise_terminated)  # torchrun stops the other ranks so: clean up first
    try:
        args = vars(build_parser().parse_args(argv))
        if args.get("plan"):
            return print_plan(args, argv)
        if args.get("nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
            return launch_torchrun(args["nproc"], argv)
        run(config_from_args(argv))
    except (ConfigError, DataError, CalibrationError) as err:
        print(f"{prefix}{err}", file=sys.stderr)
        return 2
    except torch_distributed_errors() as err:  # another rank failed or died: say so instead of a traceback
        print(f"{prefix}a collective with the other ranks failed ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); see the other ranks' errors", file=sys.stderr)
        return 3
    except Terminated:
        print(f"{prefix}terminated (in a distributed run: another rank failed); nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prefix}interrupted; finished layers are kept: rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


class Terminated(Exception):
    """SIGTERM, turned into an exception so that the staging directory is removed on the way out."""


def _raise_terminated(_signum, _frame):
    raise Terminated


def torch_distributed_errors() -> tuple[type[BaseException], ...]:
    """What a collective raises when a peer died, failed or timed out (only in a distributed run)."""
    import torch.distributed as torch_dist

    if os.environ.get("WORLD_SIZE", "1") == "1" or not torch_dist.is_available():
        return ()
    return (torch_dist.DistError,)
