"""Every command README.md and serve/README.md show (bash blocks; inline `.venv/bin/python ...` and
`make ...`) is accounted for: run verbatim here, run verbatim by a named test, or listed with the
reason it cannot run on these machines. A new command in a README fails the first test until it
is added to COMMANDS; the runnable ones are run as typed, in a fresh shell at the repository root.
"""

import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.test_first_run import fresh_shell_env
from tlq_vllm.serve.cli import curl_example
from tlq_vllm.serve.process import stop_process_group, wait_until_healthy

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "serve" / "README.md"]
FIRST_RUN = "tests/test_first_run.py::test_make_calibrate_then_printed_serve_command_then_printed_curl"
RUN = "run here"

COMMANDS = {
    "make calibrate": FIRST_RUN,
    "make test": "not here: it is the test suite itself (.ci/run runs it)",
    'make calibrate ARGS="--help"': RUN,
    "make test-fast": "not here: the test suite's fast subset (would run the suite inside itself)",
    "make setup": RUN,
    ".venv/bin/python -m tlq_vllm.calibrate --help": RUN,
    ".venv/bin/python -m tlq_vllm.calibrate --model Qwen/Qwen2-VL-7B-Instruct --data my_calib.jsonl "
    "--num-samples 128 --method tlq --scheme W4A16 --output out/qwen2-vl-7b-w4a16":
        "not here: needs Qwen2-VL-7B's weights from the hub and a user's my_calib.jsonl",
    ".venv/bin/python -m tlq_vllm.calibrate --recipe calibrate/qwen2-vl-7b-w4a16.yaml --data my_calib.jsonl":
        "not here: the recipe's model is Qwen2-VL-7B from the hub",
    ".venv/bin/python -m tlq_vllm.calibrate --plan --model qwen2-vl-7b --num-samples 128 --max-seq-len 2048 "
    "--nproc 2 --device-mem 24GiB": RUN,
    ".venv/bin/python -m tlq_vllm.serve out/toyvlm-tlq-w4a16": FIRST_RUN + " (the command make calibrate prints)",
    ".venv/bin/python -m tlq_vllm.serve CKPT --preset 2x3090 --port 8000 --api-key $KEY -- --max-num-seqs 8":
        "not here: two CUDA GPUs",
    "serve/cpu.sh out/toyvlm-tlq-w4a16 --port 8000": "test_launch_script_serves_on_port_8000",
    "serve/launch.sh 1x3090 /models/qwen2-vl-7b-w4a16": "not here: one CUDA GPU and a 7B checkpoint",
    "make bench-accuracy": "not here as a test: a benchmark (about 30 min); its quick matrix is tests/test_eval.py",
    'make bench-accuracy ARGS="--data scenes"': "not here as a test: a benchmark (hours on 2 cores); its quick "
    "matrix is tests/test_eval.py::test_quick_scene_benchmark_reports_types_captions_and_paired_intervals",
    "make bench-serving": "not here as a test: a benchmark; its --quick run is tests/test_serving_bench.py",
    "make bench-kernels": "not here as a test: a benchmark; a reduced CPU run is tests/test_kernels_bench.py",
    "make bench-calibration": "not here as a test: a benchmark (tens of minutes); its --quick run is "
    "tests/test_calibration_bench.py",
    "python -m venv .venv-gpu && . .venv-gpu/bin/activate": "not here: the CUDA install (a GPU machine)",
    'pip install -e ".[gpu,dev]"': "not here: the CUDA install (a GPU machine)",
}


def readme_commands(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#") and not line.startswith("curl "):
                found.append(re.sub(r"\s+", " ", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [c for c in re.findall(r"`([^`\n]+)`", prose) if c.startswith((".venv/bin/python ", "make "))]
    return found


def test_every_readme_command_is_accounted_for():
    shown = {c for path in READMES for c in readme_commands(path)}
    missing = sorted(shown - COMMANDS.keys())
    assert not missing, f"README commands with no test or reason (add them to COMMANDS): {missing}"
    assert not sorted(COMMANDS.keys() - shown), "COMMANDS lists commands no README shows any more"


def test_readme_curl_is_what_the_launcher_prints():
    """README's curl example is the launcher's, for the default run's checkpoint on the default port, so
    the first-run test (which runs the printed one) runs it."""
    text = (ROOT / "README.md").read_text()
    assert curl_example("http://127.0.0.1:8000", "out/toyvlm-tlq-w4a16", None) in text


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if how == RUN])
def test_runnable_readme_command(command):
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=fresh_shell_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.slow
def test_launch_script_serves_on_port_8000(tmp_path):
    """serve/cpu.sh as README shows it: the trained toy VLM's own directory stands in for the calibrated
    out/ checkpoint when no earlier test made one (the script and the preset are what is tested)."""
    checkpoint = ROOT / "out" / "toyvlm-tlq-w4a16"
    command = "serve/cpu.sh out/toyvlm-tlq-w4a16 --port 8000"
    if not (checkpoint / "config.json").is_file():
        command = command.replace("out/toyvlm-tlq-w4a16", "tlq_vllm/assets/toyvlm-easyvqa")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=fresh_shell_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(proc, "http://127.0.0.1:8000", log, timeout=420)
        with urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=10) as r:
            assert r.status == 200
        assert "preset " + str(ROOT / "serve" / "cpu.yaml") in log.read_text()
    finally:
        stop_process_group(proc)


def test_plan_suggestions_run_verbatim_and_fit():
    """`--plan` prints each suggestion as a `plan it:` command; typed as printed, each one fits."""
    command = ".venv/bin/python -m tlq_vllm.calibrate --plan --model qwen2-vl-7b --device-mem 8GiB --host-mem 32GiB"
    first = subprocess.run(["bash", "-c", command], cwd=ROOT, env=fresh_shell_env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 1 and "does NOT fit" in first.stdout, first.stdout + first.stderr
    suggested = [line.split("plan it:", 1)[1].strip() for line in first.stdout.splitlines() if "plan it:" in line]
    assert suggested, first.stdout
    for line in suggested:
        done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=fresh_shell_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and ": fits" in done.stdout, f"{line}\n{done.stdout}\n{done.stderr}"
