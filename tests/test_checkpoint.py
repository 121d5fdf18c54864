import os

import pytest
import torch

from trainer.runtime import checkpoint


class Boom(RuntimeError):
    pass


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_atomic({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def crash_half_way(obj, f):
        real_save({"step": 2, "w": torch.zeros(1000)}, f)
        f.truncate(f.tell() // 2)   # half a file on disk, then the process "dies"
        raise Boom()
    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(Boom):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]   # no temporary file left behind


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(path))
    assert str(e.value).startswith(f"{path}: not a readable checkpoint") and "\n" not in str(e.value)


def test_a_failed_write_keeps_both_checkpoints_and_is_one_line(tmp_path, monkeypatch):
    """A full disk mid-write: CheckpointError naming the file, checkpoint.pt and its .prev as they were."""
    import errno
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checked({"step": 1, "w": torch.ones(10)}, path)
    checkpoint.save_checked({"step": 2, "w": torch.ones(10) * 2}, path)
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_checked({"step": 3, "w": torch.ones(10) * 3}, path)
    monkeypatch.undo()
    assert str(e.value) == f"{path}: cannot write (No space left on device); the previous file is kept"
    assert checkpoint.load_checked(path)["step"] == 2   # step 3 never replaced it
    assert checkpoint.load_checked(path + ".prev")["step"] == 2   # the link moved on before the write
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.prev"]
