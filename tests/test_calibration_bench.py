"""The calibration benchmark (benchmarks/calibration.py): a quick end-to-end run on a tiny fixture checks
that every method's child run is measured and the results render; the report's arithmetic is checked
on a constructed report (ratios to the peer, RSS over weights)."""

import json

import pytest

from benchmarks import calibration
from benchmarks.calibration_report import facts_paragraph, render_markdown, rows


def test_stage_seconds_from_the_calibrators_events():
    events = [{"event": "start", "time": 12.0}, {"event": "data", "time": 13.5}, {"event": "importance", "time": 15.0},
              {"event": "layer", "time": 16.0}, {"event": "layer", "time": 18.0}, {"event": "done", "time": 18.5}]
    assert calibration.stage_seconds(events, 10.0) == {"load": 2.0, "data": 1.5, "importance": 1.5, "layers": 3.0,
                                                        "export": 0.5}
    rtn = [{"event": "start", "time": 12.0}, {"event": "done", "time": 14.0}]
    assert calibration.stage_seconds(rtn, 10.0) == {"load": 2.0, "export": 2.0}


def constructed_report(with_peer: bool) -> dict:
    runs = [{"method": "gptq", "scheme": "W4A16", "exit": 0, "wall_s": 80.0, "peak_rss_mib": 3072.0,
             "stages_s": {"load": 5.0, "layers": 70.0}, "planned": {"host_peak_mib": 3000.0, "stage": "calibrate"}}]
    runs.append({"method": "llmcompressor-gptq", "scheme": "W4A16", "exit": 0, "wall_s": 100.0, "peak_rss_mib": 2048.0}
                if with_peer else {"method": "llmcompressor-gptq", "scheme": "W4A16", "skipped": "no .venv-llmc"})
    return {"date": "2026-12-02", "machine": {"cpu_model": "X", "logical_cpus": 2, "isa_flags": ["avx2"],
                                              "loadavg_start": [0.1]},
            "model": {"name": "m", "parameters": 1_000_000_000, "weight_bytes": 2 * 2**30},
            "data": {"num_samples": 8, "image_size": 448, "vision_tokens_per_image": 256}, "runs": runs}


def test_report_ratios_to_the_peer_and_to_the_weights():
    table = rows(constructed_report(with_peer=True))
    assert table[0][:7] == ["gptq", "80.0", "0.80x", "3072", "1.50x", "1.50", "3000"]
    text = facts_paragraph(constructed_report(with_peer=True))
    assert "gptq took 0.80x llm-compressor's wall time at 1.50x its peak RSS." in text
    skipped = facts_paragraph(constructed_report(with_peer=False))
    assert "llm-compressor did not run (no .venv-llmc)" in skipped and "took" not in skipped
    assert "| llmcompressor-gptq | - |" in render_markdown(constructed_report(with_peer=False))


def test_a_child_reports_its_own_peak_not_the_benchmarks(tmp_path):
    """A child that touches 100 MiB, run by this process after it touched 600 MiB (and freed them): its
    peak RSS is its own, about 100 MiB plus an interpreter, not this process's 600+ (Linux hands a
    process the peak of the memory it replaces at exec; run_child spawns through a small interpreter)."""
    import resource
    import sys

    held = bytearray(600 << 20)  # zero-filled, so every page is touched
    del held
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 >= 600
    child = [sys.executable, "-c", "b = bytearray(100 << 20)"]
    got = calibration.run_child(child, tmp_path / "child.log")
    assert got["exit"] == 0 and 100 <= got["peak_rss_mib"] < 100 + 150, got
    failed = calibration.run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log")
    assert failed["exit"] == 3
    missing = calibration.run_child([str(tmp_path / "no-such-program")], tmp_path / "missing.log")
    assert missing["exit"] == 127 and missing["peak_rss_mib"] is None
    assert "no-such-program" in (tmp_path / "missing.log").read_text()


def test_unknown_method_is_one_clear_error(capsys):
    assert calibration.main(["--quick", "--methods", "gptq,awq"]) == 2
    assert "unknown awq" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_measures_every_method(tmp_path):
    assert calibration.main(["--quick", "--methods", "rtn,gptq", "--num-samples", "2", "--results-dir",
                             str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "results" / "calibration.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["rtn", "gptq"]
    for r in report["runs"]:
        assert r["exit"] == 0 and r["wall_s"] > 0 and r["peak_rss_mib"] > 100
        assert r["stages_s"]["load"] > 0 and "export" in r["stages_s"]
        assert r["planned"]["host_peak_mib"] > 0
    assert "layers" in report["runs"][1]["stages_s"]  # GPTQ logs its layers; RTN's quantization counts as export
    assert report["data"]["vision_tokens_per_image"] == 16  # 112 px / 28 px per merged token, squared
    assert report["data"]["measured"] and report["data"]["tokens"] == report["runs"][1]["data"]["tokens"] > 32
    assert (tmp_path / "results" / "CALIBRATION.md").read_text().startswith("# Calibration time and memory")
    assert (tmp_path / "results" / "calibration.png").stat().st_size > 1000
