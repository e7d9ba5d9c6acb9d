"""The launcher's fitting of presets to checkpoints, its media-URL guard and the printed commands (fast)."""

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from tlq_vllm.paths import TOYVLM_DIR, python_command
from tlq_vllm.serve import media_guard
from tlq_vllm.serve.cli import main as serve_main
from tlq_vllm.serve.limits import derive_limits, model_max_len


def write_checkpoint(path: Path, *, max_positions=1024, rope=None, processor=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    text = {"max_position_embeddings": max_positions, **({"rope_scaling": rope} if rope else {})}
    (path / "config.json").write_text(json.dumps({"text_config": text}))
    if processor is not None:
        (path / "processor_config.json").write_text(json.dumps({"image_processor": processor}))
    return path


QWEN_PROCESSOR = {"patch_size": 14, "merge_size": 2, "size": {"longest_edge": 12845056, "shortest_edge": 3136}}


def test_max_model_len_is_the_smaller_of_preset_and_model(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m", max_positions=1024)
    args, changes = derive_limits(ckpt, {"max-model-len": 2048}, {})
    assert args["max-model-len"] == 1024
    assert [c.option for c in changes] == ["max-model-len"]
    assert "the preset asks 2048" in changes[0].reason
    args, changes = derive_limits(ckpt, {"max-model-len": 512}, {})  # preset below the model: kept
    assert args["max-model-len"] == 512 and changes == []


def test_rope_factor_extends_the_model_maximum(tmp_path):
    yarn = write_checkpoint(tmp_path / "yarn", max_positions=1024, rope={"rope_type": "yarn", "factor": 4.0})
    assert model_max_len(yarn) == 4096
    mrope = write_checkpoint(tmp_path / "mrope", max_positions=1024, rope={"type": "mrope", "mrope_section": [1]})
    assert model_max_len(mrope) == 1024


def test_user_max_model_len_is_kept_or_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m", max_positions=1024)
    args, changes = derive_limits(ckpt, {"max-model-len": 2048}, {"max-model-len": "512"})
    assert changes == [] and args["max-model-len"] == 2048  # the flag itself reaches vLLM and wins
    with pytest.raises(ValueError, match="exceeds the model's maximum of 1024"):
        derive_limits(ckpt, {}, {"max-model-len": "4096"})


def test_image_pixels_capped_to_half_the_context(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m", max_positions=2048, processor=QWEN_PROCESSOR)
    args, changes = derive_limits(ckpt, {"max-model-len": 2048, "limit-mm-per-prompt": '{"image": 2}'}, {})
    pixels = json.loads(args["mm-processor-kwargs"])["max_pixels"]
    assert pixels == 2048 // 2 // 2 * 28 * 28  # two images share half of 2048 tokens, 784 pixels per token
    assert "2 image(s) per prompt" in changes[-1].reason
    # A preset that already asks few enough pixels is left alone, and so is a processor without a pixel budget.
    small = {"max-model-len": 2048, "mm-processor-kwargs": '{"max_pixels": 200704}'}
    assert derive_limits(ckpt, small, {})[1] == []
    siglip = write_checkpoint(tmp_path / "s", max_positions=2048, processor={"size": {"height": 384, "width": 384}})
    assert derive_limits(siglip, {"max-model-len": 2048}, {})[1] == []


def test_launcher_dry_run_on_the_toy_vlm_fits_the_cpu_preset(capsys):
    assert serve_main([str(TOYVLM_DIR), "--preset", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tlq serve: max-model-len 1024: the model's maximum (the preset asks 2048)" in out
    command = shlex.split(out.strip().splitlines()[-1])
    assert command[command.index("--max-model-len") + 1] == "1024"
    assert command[command.index("--middleware") + 1] == "tlq_vllm.serve.media_guard.MediaURLGuard"
    assert "--allowed-media-domains" not in command


def test_launcher_refuses_a_context_beyond_the_model(capsys):
    assert serve_main([str(TOYVLM_DIR), "--dry-run", "--", "--max-model-len", "4096"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --max-model-len 4096 exceeds the model's maximum of 1024")


def test_allowed_domains_reach_vllm_and_the_guard(tmp_path, capsys, monkeypatch):
    preset = tmp_path / "p.yaml"
    preset.write_text("args:\n  allowed-media-domains: [images.example.org]\n")
    seen = {}
    monkeypatch.setattr(os, "execve", lambda exe, cmd, env: seen.update(cmd=cmd, env=env))
    monkeypatch.setattr("tlq_vllm.serve.cli.check_port_free", lambda host, port: None)
    assert serve_main([str(TOYVLM_DIR), "--preset", str(preset)]) == 0
    assert seen["cmd"][seen["cmd"].index("--allowed-media-domains") + 1] == "images.example.org"
    assert seen["env"][media_guard.ENV_DOMAINS] == "images.example.org"
    assert seen["env"][media_guard.ENV_LOCAL] == ""
    assert serve_main([str(TOYVLM_DIR), "--preset", str(preset), "--allowed-media-domains", "a.org", "b.org",
                       "--", "--allowed-local-media-path", str(tmp_path)]) == 0
    assert seen["env"][media_guard.ENV_DOMAINS] == "a.org,b.org" and seen["env"][media_guard.ENV_LOCAL] == "1"


@pytest.mark.parametrize(("url", "allowed"), [
    ("data:image/png;base64,AAAA", True),
    ("http://images.example.org/cat.png", True),
    ("HTTPS://IMAGES.EXAMPLE.ORG/cat.png", True),
    ("https://evil.example.com/cat.png", False),
    ("http://169.254.169.254/latest/meta-data", False),
    ("file:///etc/passwd", False),
])
def test_media_policy(url, allowed):
    policy = media_guard.MediaPolicy(frozenset({"images.example.org"}))
    assert (policy.refusal(url) is None) == allowed
    assert media_guard.MediaPolicy(allow_local=True).refusal("file:///srv/img.png") is None


def test_media_urls_found_anywhere_in_a_request():
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://a/x.png"}},
        {"type": "input_image", "image_url": "http://b/y.png"},
        {"type": "text", "text": "http://not-a-media-url"}]}]}
    assert media_guard.media_urls(body) == ["http://a/x.png", "http://b/y.png"]


def run_guard(body: bytes, policy: media_guard.MediaPolicy):
    """Drives MediaURLGuard as an ASGI server would, with a body split in two chunks; returns what the app
    received (None if it was not called) and the response messages sent."""
    received, sent = {}, []
    chunks = [{"type": "http.request", "body": body[:5], "more_body": True},
              {"type": "http.request", "body": body[5:], "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        message = await receive()
        received["body"], received["more_body"] = message["body"], message["more_body"]

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    asyncio.run(media_guard.MediaURLGuard(app, policy)(scope, receive, send))
    return received.get("body"), sent


def test_guard_refuses_with_400_and_replays_allowed_bodies():
    bad = json.dumps({"messages": [{"content": [{"image_url": {"url": "file:///etc/passwd"}}]}]}).encode()
    body, sent = run_guard(bad, media_guard.MediaPolicy())
    assert body is None and sent[0]["status"] == 400
    assert "file:// media URLs are disabled" in json.loads(sent[1]["body"])["error"]["message"]
    good = json.dumps({"messages": [{"content": [{"image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode()
    body, sent = run_guard(good, media_guard.MediaPolicy())
    assert body == good and sent == []


def test_python_command_is_the_running_interpreter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(shlex.split(python_command())[0]).absolute() == Path(sys.executable).absolute()
    monkeypatch.chdir(Path(sys.executable).parents[2])  # the venv's parent: a relative path
    assert not python_command().startswith("/")
    assert Path(python_command()).absolute() == Path(sys.executable).absolute()


def test_plan_suggestions_print_runnable_commands():
    from tlq_vllm.calibrate.cli import command_with

    argv = ["--plan", "--model", "qwen2-vl-7b", "--max-seq-len", "2048", "--num-samples=128"]
    line = command_with(argv, {"--max-seq-len": 768, "--num-samples": 32})
    tokens = shlex.split(line)
    assert tokens[1:3] == ["-m", "tlq_vllm.calibrate"]
    assert tokens[3:] == ["--plan", "--model", "qwen2-vl-7b", "--max-seq-len", "768", "--num-samples", "32"]
