import os

import pytest
import torch

from trainer import checkpoint


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
