"""A full disk while the checkpoint is written: one error line naming the output, exit 2, and no
output directory (or the previous one, untouched, under --overwrite), no staging left behind.

Once on a real small filesystem (a 256 KiB tmpfs, where this machine lets us mount one: the
fixture's checkpoint is megabytes), and always with ENOSPC injected into each kind of writer:
safetensors (which reports it as a SafetensorError, not an OSError) and plain file copies.
"""

import errno
import shutil
import subprocess

import pytest
from safetensors import SafetensorError

import tlq_vllm.calibrate.export as export
from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.cli import main

ARGV = ["--model", "fixture:qwen2-vl", "--method", "rtn", "--no-progress"]


def disk_full_error(capsys, out, *extra):
    code = main([*ARGV, "--output", str(out), *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert errors[0].startswith(f"error: no space left on the device for {out} (No space left on device)"), errors
    assert not [p for p in out.parent.iterdir() if ".tlq-" in p.name]  # no staging, no renamed old output
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_is_one_error_line_and_leaves_nothing(small_disk, capsys):
    out = small_disk / "out"
    assert "; nothing was written: " in disk_full_error(capsys, out)
    assert list(small_disk.iterdir()) == []


def test_a_real_full_disk_keeps_the_previous_output_under_overwrite(small_disk, capsys):
    out = small_disk / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous checkpoint")
    assert "the previous checkpoint there is kept as it was" in disk_full_error(capsys, out, "--overwrite")
    assert [p.name for p in small_disk.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous checkpoint"


def safetensors_runs_out(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # a partial file, as a real full disk leaves one
        f.write(b"\0" * 1024)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def copy_runs_out(src, dst, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(dst))


@pytest.mark.parametrize("writer", ["safetensors", "file copy"])
def test_injected_enospc_is_one_error_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, writer):
    import transformers.modeling_utils

    if writer == "safetensors":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", safetensors_runs_out)
    else:
        monkeypatch.setattr(export.shutil, "copy2", copy_runs_out)
    out = tmp_path / "out"
    line = disk_full_error(capsys, out)
    assert "free some space there or choose another --output" in line
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def permission_denied(src, dst, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(export.shutil, "copy2", permission_denied)
    with pytest.raises(PermissionError):
        run(CalibrationConfig(model="fixture:qwen2-vl", method="rtn", output=str(tmp_path / "out"), progress=False))
    assert list(tmp_path.iterdir()) == []
