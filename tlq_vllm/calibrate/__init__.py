"""The TLQ calibrator: `run(CalibrationConfig(...)) -> Path` or `python -m tlq_vllm.calibrate`."""

from tlq_vllm.calibrate.config import CalibrationConfig


def run(config: CalibrationConfig):
    """Calibrates and exports; returns the checkpoint directory (see tlq_vllm.calibrate.pipeline)."""
    from tlq_vllm.calibrate.pipeline import run as _run

    return _run(config)


__all__ = ["CalibrationConfig", "run"]
