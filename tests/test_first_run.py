"""A new user's first run, verbatim: `make calibrate`, then the serve command it printed, typed in a
fresh shell (no venv activated, no vLLM variables), then the curl example the server printed.

Also the wheel: built with `pip wheel . --no-deps`, installed into a throwaway environment that
reuses the main venv's packages, and asked for its presets, a shipped recipe and a plan from there.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tlq_vllm.eval.endpoint import image_data_url
from tlq_vllm.serve.process import free_port, stop_process_group, wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def fresh_shell_env() -> dict:
    """What a new login shell has: no venv on PATH, none of the variables the Makefile or tests set."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    if "TLQ_CACHE_DIR" in os.environ:
        env["TLQ_CACHE_DIR"] = os.environ["TLQ_CACHE_DIR"]
    return env


def printed_line(text: str, label: str) -> str:
    lines = [line.split(label, 1)[1].strip() for line in text.splitlines() if label in line]
    assert lines, f"no {label!r} line in:\n{text[-2000:]}"
    return lines[-1]


def test_make_calibrate_then_printed_serve_command_then_printed_curl(tmp_path):
    import easy_vqa
    import openai

    calibrate = subprocess.run(["make", "calibrate"], cwd=ROOT, env=fresh_shell_env(), capture_output=True,
                               text=True, timeout=900)
    assert calibrate.returncode == 0, calibrate.stdout[-2000:] + calibrate.stderr[-2000:]
    serve_command = printed_line(calibrate.stdout + calibrate.stderr, "serve it:")
    assert serve_command.startswith(".venv/bin/python -m tlq_vllm.serve ")  # the interpreter that ran, not `python`

    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(f"{serve_command} --port {port}", shell=True, cwd=ROOT, env=fresh_shell_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, log, timeout=420)
        text = log.read_text()
        assert "tlq serve: max-model-len 1024: the model's maximum (the preset asks 2048)" in text
        model = printed_line(text, "tlq serve: ").split(" at ")[0]
        image = easy_vqa.get_test_image_paths()[0]

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                                 {"type": "text", "text": "What color is the shape?"}]}]
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content

        # The curl example exactly as printed, in a directory holding an image.png.
        curl = text.split("try it (with an image.png in the current directory):\n", 1)[1].splitlines()[0]
        shutil.copy(image, tmp_path / "image.png")
        answer = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["choices"][0]["message"]["content"]

        # Production defaults: remote and file:// image URLs get a 400 with a clear message, and the
        # server keeps answering good requests.
        for bad_url, why in (("http://images.example.com/cat.png", "remote media URLs are disabled"),
                             ("file:///etc/hostname", "file:// media URLs are disabled")):
            bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad_url}},
                                                {"type": "text", "text": "hi"}]}]
            with pytest.raises(openai.BadRequestError, match=why):
                client.chat.completions.create(model=model, messages=bad, max_tokens=2)
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content
    finally:
        stop_process_group(proc)


def test_allowed_domain_is_fetched_and_large_images_fit_the_context(tmp_path):
    """A preset option allows one domain (a loopback HTTP server here): its images are fetched, other
    hosts are still refused; and a context too short for the processor's largest image gets a pixel cap."""
    import http.server
    import threading

    import openai
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from tlq_vllm.serve.process import ServerProcess
    from tlq_vllm.testing import build_fixture

    (tmp_path / "www").mkdir()
    Image.new("RGB", (224, 224), (200, 30, 30)).save(tmp_path / "www" / "red.png")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    preset = tmp_path / "allow.yaml"
    preset.write_text("env:\n  VLLM_TARGET_DEVICE: cpu\n  VLLM_CPU_KVCACHE_SPACE: '1'\n"
                      "args:\n  max-model-len: 96\n  limit-mm-per-prompt: '{\"image\": 1}'\n"
                      "  allowed-media-domains: [127.0.0.1]\n")
    log = tmp_path / "server.log"
    try:
        with ServerProcess(build_fixture("qwen2-vl"), log=log, preset=str(preset)) as url:
            assert "max_pixels 37632 (48 vision tokens per image)" in log.read_text()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            model = [m.id for m in client.models.list()][0]

            def ask(image_url):
                content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Colour?"}]
                return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                      max_tokens=2, temperature=0)

            # 224 x 224 is 64 vision tokens uncapped; under the 37632-pixel cap the processor's smart_resize
            # makes it 168 x 168 = 36 tokens. 56 x 56 is below the minimum: 112 x 112 = 16 tokens.
            fetched = ask(f"http://127.0.0.1:{images.server_port}/red.png")
            assert fetched.choices[0].message.content is not None
            buffer = io.BytesIO()
            Image.new("RGB", (56, 56), (200, 30, 30)).save(buffer, format="PNG")
            small = ask("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
            height, width = smart_resize(224, 224, factor=28, min_pixels=112 * 112, max_pixels=37632)
            assert fetched.usage.prompt_tokens - small.usage.prompt_tokens == height * width // 784 - 16 == 36 - 16
            with pytest.raises(openai.BadRequestError, match="allowed domains: 127.0.0.1"):
                ask(f"http://localhost:{images.server_port}/red.png")
    finally:
        images.shutdown()


def run_ok(cmd, **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_wheel_install_finds_presets_recipes_and_model_snapshots(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "out", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    # Offline: the venv's setuptools builds it (pip would otherwise fetch one for an isolated build).
    run_ok([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
            "-w", str(tmp_path / "dist")], cwd=source)
    wheel = next((tmp_path / "dist").glob("tlq_vllm-*.whl"))

    env_dir = tmp_path / "env"
    run_ok([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    site = next(env_dir.glob("lib/python*/site-packages"))
    main_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "vllm").is_dir())
    (site / "main-venv.pth").write_text(main_site + "\n")  # the main venv's packages, not its editable tlq_vllm
    run_ok([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--no-deps",
            "--no-index", "-q", str(wheel)])
    python = str(env_dir / "bin" / "python")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = run_ok([python, "-c", "import tlq_vllm.paths as p; print(p.PACKAGE_DIR, p.user_folder('serve'))"],
                   cwd=elsewhere)
    assert where.split()[0].startswith(str(site)) and "_bundled" in where.split()[1]
    help_text = run_ok([python, "-m", "tlq_vllm.serve", "--help"], cwd=elsewhere)
    for preset in ("cpu", "1x3090", "2x3090", "4x3090"):
        assert re.search(rf"\b{preset}\b", help_text), help_text
    plan = run_ok([python, "-m", "tlq_vllm.calibrate", "--plan", "--model", "qwen2-vl-7b"], cwd=elsewhere)
    assert plan.startswith("qwen2-vl-7b: 8.29 B parameters")
    recipe = run_ok([python, "-m", "tlq_vllm.calibrate", "--plan", "--recipe", "qwen2-vl-7b-w4a16",
                     "--model", "qwen2-vl-7b"], cwd=elsewhere)
    assert "W4A16" in recipe
