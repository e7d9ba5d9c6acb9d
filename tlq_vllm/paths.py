"""Where tlq_vllm's files live, stated once: caches, user-editable folders, package data.

Two folders are meant to be edited by users and live at the repository root, next to the code:
`serve/` (serving presets and launch scripts) and `calibrate/` (calibration recipes). A wheel has
no repository root, so the build (setup.py) copies both into the package as `tlq_vllm/_bundled/`.
`user_folder()` returns the checkout's folder when tlq_vllm runs from a checkout, else the
bundled copy: one lookup that works editable and installed.

Facts that are not user-edited (the toy VLM, the config.json snapshots the planner reads) are
ordinary package data under `tlq_vllm/`.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent  # the repository root when running from a checkout
BUNDLED_DIR = PACKAGE_DIR / "_bundled"
USER_FOLDERS = ("serve", "calibrate")

TOYVLM_DIR = PACKAGE_DIR / "assets" / "toyvlm-easyvqa"
TESTBED_DIR = PACKAGE_DIR / "assets" / "toyvlm-scenes"  # toy VLM v2 (benchmarks/toyvlm2), `--model testbed`
MODEL_CONFIG_SNAPSHOTS = PACKAGE_DIR / "models" / "config_snapshots"


def cache_root() -> Path:
    """Where built fixtures, resume state and other caches live: `$TLQ_CACHE_DIR` or ~/.cache/tlq_vllm."""
    return Path(os.environ.get("TLQ_CACHE_DIR", Path.home() / ".cache" / "tlq_vllm"))


def running_from_checkout() -> bool:
    """True when the package is the `tlq_vllm/` of a source tree (editable install or PYTHONPATH)."""
    return (CHECKOUT_DIR / "pyproject.toml").is_file() and (CHECKOUT_DIR / "serve").is_dir()


def user_folder(name: str) -> Path:
    """The user-editable folder `name` ("serve" or "calibrate"): the checkout's, or the bundled copy."""
    if name not in USER_FOLDERS:
        raise ValueError(f"unknown user folder {name!r}; one of {', '.join(USER_FOLDERS)}")
    return CHECKOUT_DIR / name if running_from_checkout() else BUNDLED_DIR / name


def python_command() -> str:
    """How to type this interpreter in a fresh shell at the current directory.

    Printed commands must work verbatim: a bare `python` in a new shell is usually not the venv's
    interpreter. The path is made relative when the interpreter lies under the working directory
    (`.venv/bin/python`), and kept absolute otherwise. The venv's own path is used, not the
    symlink target, so that the venv's site-packages apply."""
    exe = Path(sys.executable)
    try:
        text = str(exe.absolute().relative_to(Path.cwd()))
    except ValueError:
        text = str(exe.absolute())
    return shlex.quote(text)
