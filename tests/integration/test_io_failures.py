"""Failed writes are named: disk full, read-only, permission denied, for checkpoints, metrics, summaries.

Each stops with one `StorageError` line naming the path, the errno text and the last complete checkpoint, and
leaves what was already written as it was. The full and read-only disks are real (a tmpfs of a few MB, when
mounting is permitted); the permission test drops root's privileges in a child process. The end-to-end runs
(full disk, then resume to the uninterrupted result) are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import prefopt.checkpoint as checkpoint
from prefopt.checkpoint import list_checkpoints, load_latest, remove_partial, save_checkpoint
from prefopt.errors import PrefoptError, StorageError
from prefopt.io import append_text, atomic_dir, atomic_write_text, os_error_of, remove_leftovers
from prefopt.tracking import RunLog
from tests.helpers.small_fs import fill, remount_read_only, tmpfs

ENOSPC = "No space left on device [ENOSPC]"


def tiny_model(hidden: int = 16, vocab: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return Qwen2ForCausalLM(config)


def state(step: int) -> dict:
    return {"step": step, "optimizer": {"exp_avg": torch.ones(4) * step}}


@pytest.fixture
def small_fs(tmp_path):
    with tmpfs(tmp_path / "fs", size="4m") as mnt:
        yield mnt


def test_a_failed_checkpoint_write_names_path_errno_and_last_checkpoint(tmp_path, monkeypatch):
    ckpts, model = tmp_path / "checkpoints", tiny_model()
    save_checkpoint(ckpts, 3, model, state(3))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(StorageError) as info:
        save_checkpoint(ckpts, 6, model, state(6))
    message = str(info.value)
    assert message == (
        f"cannot write checkpoint {ckpts / 'step_00000006'}: {ENOSPC}; the last complete checkpoint "
        f"is {ckpts / 'step_00000003'}; rerun the same command to resume from it"
    )
    assert "\n" not in message and isinstance(info.value, PrefoptError)
    assert [p.name for p in ckpts.iterdir()] == ["step_00000003"]  # the partial one is gone, the old one kept
    monkeypatch.undo()
    found = load_latest(ckpts, tiny_model())
    assert found is not None and found[1]["step"] == 3


def test_torch_saves_own_error_is_seen_through(tmp_path, monkeypatch):
    # torch.save reports a failed write as `RuntimeError: [enforce fail at inline_container.cc ...] unexpected
    # pos`; the OSError of the Python file it wrote to is that error's context.
    real_save = torch.save

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 300:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

    def save(obj, fh, *a, **k):
        return real_save(obj, FullDisk(fh), *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(StorageError) as info:
        save_checkpoint(tmp_path / "ckpts", 1, tiny_model(), {"big": torch.zeros(1000)})
    assert f"step_00000001: {ENOSPC}; no complete checkpoint" in str(info.value)
    assert not list((tmp_path / "ckpts").iterdir())


def test_os_error_of_reads_what_libraries_wrap():
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors
    assert os_error_of(wrapped).errno == errno.ENOSPC
    assert os_error_of(ValueError("[Errno 13] Permission denied: '/x'")).errno == errno.EACCES
    assert os_error_of(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5 vs 3")) is None
    assert os_error_of(RuntimeError("size mismatch")) is None


def test_a_really_full_disk_during_a_checkpoint(small_fs):
    ckpts, model = small_fs / "checkpoints", tiny_model(hidden=128, vocab=1024)  # ~1.2 MB of weights
    first = save_checkpoint(ckpts, 3, model, state(3))
    filler = fill(small_fs, leave=256 * 1024)
    with pytest.raises(StorageError) as info:
        save_checkpoint(ckpts, 6, model, state(6))
    assert str(info.value).startswith(f"cannot write checkpoint {ckpts / 'step_00000006'}: {ENOSPC}")
    assert f"the last complete checkpoint is {first}" in str(info.value)
    assert list_checkpoints(ckpts) == [first] and not list(ckpts.glob(".tmp-*"))  # its space is given back
    filler.unlink()
    assert save_checkpoint(ckpts, 6, model, state(6)).name == "step_00000006"  # once there is room, it goes on


def test_a_failed_append_keeps_every_complete_line(small_fs):
    run_log = RunLog(small_fs / "run", {})
    run_log.log(1, {"train/loss": 0.5})
    fill(small_fs, leave=0)
    wide = {f"train/metric_{i:04d}": float(i) for i in range(400)}  # one line of ~10 KB: past the free page
    with pytest.raises(StorageError) as info:
        run_log.log(2, wide)
    assert str(info.value).startswith(f"cannot write metrics {run_log.metrics_path}: {ENOSPC}; no complete checkpoint")
    lines = run_log.metrics_path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]  # no torn half line


def test_atomic_write_keeps_the_old_file_on_a_full_disk(small_fs):
    path = small_fs / "summary.json"
    atomic_write_text(path, '{"old": 1}')
    fill(small_fs, leave=0)
    with pytest.raises(StorageError, match="No space left on device"):
        atomic_write_text(path, "x" * 100_000, "summary")
    assert path.read_text() == '{"old": 1}'
    assert [p.name for p in small_fs.iterdir() if p.name.startswith(".tmp-")] == []


def test_a_read_only_run_directory(small_fs):
    run_log = RunLog(small_fs / "run", {})
    run_log.log(1, {"train/loss": 0.5})
    run_log.write_json("summary.json", {"status": "incomplete"})
    remount_read_only(small_fs)
    with pytest.raises(StorageError, match=r"cannot write metrics .*/metrics.jsonl: Read-only file system \[EROFS\]"):
        run_log.log(2, {"train/loss": 0.4})
    with pytest.raises(StorageError, match=r"cannot write .*/run/summary.json: Read-only file system \[EROFS\]"):
        run_log.finish({"status": "complete"})
    with pytest.raises(StorageError, match=r"cannot create run directory .*/other: Read-only file system \[EROFS\]"):
        RunLog(small_fs / "other", {})
    with pytest.raises(StorageError, match=r"cannot write checkpoint .*step_00000001: Read-only file system"):
        save_checkpoint(small_fs / "run" / "checkpoints", 1, tiny_model(), state(1))
    assert json.loads(run_log.metrics_path.read_text())["step"] == 1  # everything written before is readable
    assert json.loads((small_fs / "run" / "summary.json").read_text()) == {"status": "incomplete"}


_AS_USER = """
import sys
from pathlib import Path
from prefopt.errors import StorageError
from prefopt.tracking import RunLog
try:
    RunLog(Path(sys.argv[1]), {}).log(1, {"train/loss": 0.5})
except StorageError as exc:
    print(exc)
"""


def test_permission_denied_on_the_run_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    run_dir = locked / "run"
    cmd = [sys.executable, "-c", _AS_USER, str(run_dir)]
    if os.geteuid() == 0:  # root ignores file modes unless it gives up the capability to
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without `setpriv`: file modes cannot deny root a write")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", "--", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    finally:
        locked.chmod(0o755)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        out.stdout.strip() == f"cannot create run directory {run_dir}: Permission denied [EACCES]; "
        f"no complete checkpoint in {run_dir / 'checkpoints'} yet"
    )


def test_a_log_file_that_is_a_directory(tmp_path):
    run_log = RunLog(tmp_path / "run", {})
    run_log.metrics_path.mkdir()
    with pytest.raises(StorageError, match=r"cannot write metrics .*metrics.jsonl: Is a directory \[EISDIR\]"):
        run_log.log(1, {"train/loss": 0.5})


def test_leftovers_of_interrupted_writes_are_removed_at_the_next_start(tmp_path):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    save_checkpoint(ckpts, 3, tiny_model(), state(3))
    (ckpts / ".tmp-step_00000006").mkdir()
    (ckpts / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run_dir / ".tmp-summary.json.4242").write_text("{")
    (run_dir / "summary.json.tmp").write_text("{")  # the name used before prefopt.io
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert [p.name for p in remove_partial(ckpts)] == [".tmp-step_00000006"]
    RunLog(run_dir, {}, resume_step=1)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in ckpts.iterdir()] == ["step_00000003"]
    assert remove_leftovers(tmp_path / "missing") == []


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    final = tmp_path / "entry"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError, match="not an I/O error"), atomic_dir(final) as tmp:  # raised as it is
        (tmp / "a").write_text("2")
        raise ValueError("not an I/O error")
    assert (final / "a").read_text() == "1" and not (tmp_path / ".tmp-entry").exists()
    append_text(tmp_path / "log", "x\n")
    assert (tmp_path / "log").read_text() == "x\n"
