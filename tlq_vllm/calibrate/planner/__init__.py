"""Memory planner: each calibration stage's peak device and host memory, from config.json alone.

`plan(config_json, config)` predicts, per rank, the peak bytes of every stage of the run a
CalibrationConfig describes (`python -m tlq_vllm.calibrate --plan` builds it from the flags),
says whether they fit the given budgets and, when they do not, suggests settings that do.

    dims.py       model dimensions and parameter counts (what to read: the family's ModelAdapter)
    memory.py     the stage peak equations (its docstring states them) -> Plan
    suggest.py    the search for settings that fit; `plan` = peaks + suggestions
    snapshots.py  config.json from a directory, a file, a shipped snapshot, a fixture or a hub id
    report.py     the text: format_plan, and the README's fit table
"""

from __future__ import annotations

from pathlib import Path

from tlq_vllm.calibrate.config import CalibrationConfig
from tlq_vllm.calibrate.planner.dims import DTYPE_BYTES, ModelDims, PlanError, VisionDims, model_dims, param_count
from tlq_vllm.calibrate.planner.memory import (
    LEAN,
    RANK0_PARTS,
    STAGES,
    Assumptions,
    GiB,
    KiB,
    MiB,
    Plan,
    StagePeak,
    peaks,
)
from tlq_vllm.calibrate.planner.report import FIT_TABLE_RUN, FitRow, fit_table, format_fit_table, format_plan
from tlq_vllm.calibrate.planner.snapshots import HUB_IDS, SNAPSHOT_DIR, load_config, snapshot_names
from tlq_vllm.calibrate.planner.suggest import Suggestion, plan, suggestions


def plan_from_path(path: str | Path, config: CalibrationConfig | None = None, **kwargs) -> Plan:
    """`plan` for a model directory, a config.json path, a snapshot name, a fixture or a hub id
    (snapshots.load_config); keyword arguments as for `plan`."""
    config_json, name = load_config(path)
    kwargs.setdefault("name", name)
    return plan(config_json, config, **kwargs)


__all__ = [
    "DTYPE_BYTES", "FIT_TABLE_RUN", "HUB_IDS", "LEAN", "RANK0_PARTS", "SNAPSHOT_DIR", "STAGES", "Assumptions",
    "FitRow", "GiB", "KiB", "MiB", "ModelDims", "Plan", "PlanError", "StagePeak", "Suggestion", "VisionDims",
    "fit_table", "format_fit_table", "format_plan", "load_config", "model_dims", "param_count", "peaks", "plan",
    "plan_from_path", "snapshot_names", "suggestions",
]
