"""Launch vLLM's OpenAI-compatible server on a checkpoint, with a VLM preset.

The launcher checks what it can cheaply (the checkpoint is a model directory, the port is free),
fits the preset to the checkpoint (serve/limits.py: context length, image size), prints the URL
and a copy-paste curl example, then replaces itself with vLLM's API server (`os.execve`): signals
reach vLLM directly and no wrapper process is left to orphan. Arguments it does not know pass
through to vLLM unchanged; preset values are defaults that they override.

Presets are the YAML files of the top-level `serve/` folder of a checkout (the bundled copy in an
installed wheel; tlq_vllm.paths). Remote and file:// media URLs are refused unless allowed
(serve/media_guard.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path

import yaml

from tlq_vllm.paths import user_folder
from tlq_vllm.serve import media_guard
from tlq_vllm.serve.limits import derive_limits
from tlq_vllm.vllm_plugin import LM_HEAD_CHOICES, LM_HEAD_ENV, PLUGIN_NAME

PRESET_DIR = user_folder("serve")
MIDDLEWARE = f"{media_guard.__name__}.{media_guard.MediaURLGuard.__name__}"


class ServeError(ValueError):
    """A launch that cannot start; the message names the value and what to do."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ServeError(f"unknown preset {name!r}; choose one of {', '.join(available_presets())} or a .yaml path")
    preset = yaml.safe_load(path.read_text()) or {}
    return {"env": dict(preset.get("env") or {}), "args": dict(preset.get("args") or {})}


def default_preset() -> str:
    import torch

    return "1x3090" if torch.cuda.is_available() else "cpu"


def check_checkpoint(path: str) -> Path:
    checkpoint = Path(path)
    if not checkpoint.exists():
        raise ServeError(f"checkpoint {checkpoint} does not exist")
    if not checkpoint.is_dir() or not (checkpoint / "config.json").is_file():
        raise ServeError(f"checkpoint {checkpoint} is not a model directory (no config.json in it)")
    return checkpoint


def check_lm_head(checkpoint: Path, lm_head: str) -> dict[str, str]:
    """The plugin's environment for --lm-head; int8 needs a TLQ checkpoint (the tlq plugin holds the rows)."""
    if lm_head == "bf16":
        return {}
    import json

    quant = json.loads((checkpoint / "config.json").read_text()).get("quantization_config")
    if not isinstance(quant, dict) or PLUGIN_NAME not in quant:
        raise ServeError(f"--lm-head {lm_head} needs a TLQ checkpoint (written by `python -m tlq_vllm.calibrate`, "
                         f"served by the tlq plugin); {checkpoint} is not one")
    return {LM_HEAD_ENV: lm_head}


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServeError(
                f"cannot listen on {host}:{port} ({err.strerror}); is the port taken? pick --port"
            ) from None


def passthrough_options(extra: list[str]) -> dict[str, str | None]:
    """The vLLM options typed on the command line: name (no dashes) -> first value (None for a switch)."""
    given = {}
    for i, arg in enumerate(extra):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            following = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("--") else None
            given[name] = value if eq else following
    return given


def option_tokens(key: str, value) -> list[str]:
    """A preset entry as command-line tokens (a YAML list is a multi-value option)."""
    values = value if isinstance(value, list) else [value]
    return [f"--{key}", *(str(v) for v in values)]


def vllm_command(
    checkpoint: Path, host: str, port: int, api_key: str | None, preset_args: dict, extra: list[str]
) -> list[str]:
    given = passthrough_options(extra)
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    for key, value in preset_args.items():
        if key not in given:
            cmd += option_tokens(key, value)
    return cmd + ["--middleware", MIDDLEWARE] + extra


def media_policy_env(domains: list[str], local_media_path: str | None) -> dict[str, str]:
    """The media guard's policy (media_guard.py) for the API server's environment."""
    return {media_guard.ENV_DOMAINS: ",".join(domains), media_guard.ENV_LOCAL: "1" if local_media_path else ""}


def curl_example(url: str, model: str, api_key: str | None) -> str:
    """A shell snippet that sends image.png and a question to the server."""
    import json

    body = {
        "model": model,
        "max_tokens": 32,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,IMAGE"}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
    }
    payload = json.dumps(body).replace("IMAGE", "'\"$(base64 -w0 image.png)\"'")
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{payload}'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tlq_vllm.serve",
        description="Serve a checkpoint with vLLM's OpenAI-compatible server (/v1/chat/completions with "
        "images, /v1/models, /health, /metrics). Unknown options pass through to vLLM.",
    )
    p.add_argument("checkpoint", help="model directory (e.g. the calibrator's output)")
    p.add_argument(
        "--preset",
        help=f"serving preset: {', '.join(available_presets())} or a .yaml (default: 1x3090 with CUDA, else cpu)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TLQ_API_KEY"), help="require this bearer token")
    p.add_argument("--allowed-media-domains", nargs="+", metavar="DOMAIN",
                   help="hosts whose http(s) image URLs the server may fetch (default: the preset's, else none: "
                   "images must be sent inline as data: URLs)")
    p.add_argument("--lm-head", choices=LM_HEAD_CHOICES, default="bf16",
                   help="int8: hold the lm_head and embeddings as int8 rows, one scale per row, rounded at load "
                   "(CPU, TLQ checkpoints; README: Serving); default bf16, the model dtype")
    p.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    preset_name = args.preset or default_preset()
    try:
        checkpoint = check_checkpoint(args.checkpoint)
        preset = load_preset(preset_name)
        given = passthrough_options(extra)
        preset_args, adjustments = derive_limits(checkpoint, preset["args"], given)
        plugin_env = check_lm_head(checkpoint, args.lm_head)
        if not args.dry_run:
            check_port_free(args.host, args.port)
    except (ServeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for change in adjustments:
        print(f"tlq serve: {change.reason}")
    preset_domains = preset_args.pop("allowed-media-domains", None) or []
    if not isinstance(preset_domains, list):
        preset_domains = [preset_domains]
    domains = args.allowed_media_domains or [str(d) for d in preset_domains]
    if domains:
        preset_args["allowed-media-domains"] = domains  # vLLM enforces the same list
    cmd = vllm_command(checkpoint, args.host, args.port, args.api_key, preset_args, extra)
    local_media = given.get("allowed-local-media-path") or preset_args.get("allowed-local-media-path")
    env = {**os.environ, **{k: str(v) for k, v in preset["env"].items() if k not in os.environ},
           **media_policy_env(domains, local_media), **plugin_env}
    url = f"http://{args.host}:{args.port}"
    print(f"tlq serve: {checkpoint} at {url} (preset {preset_name}; ready when GET {url}/health answers 200)")
    example = curl_example(url, str(checkpoint), args.api_key)
    print(f"try it (with an image.png in the current directory):\n{example}", flush=True)
    if args.dry_run:
        print(shlex.join([f"{k}={v}" for k, v in plugin_env.items()] + cmd))
        return 0
    os.execve(sys.executable, cmd, env)
    return 0  # not reached
