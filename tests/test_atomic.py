import errno
import os

import numpy as np
import pytest

from data import atomic
from data.errors import InputError


class Refused(InputError):
    pass


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "a.txt")
    atomic.write_text(path, "old")
    with pytest.raises(KeyError):
        with atomic.writing(path) as f:
            f.write("half of the new")
            raise KeyError("killed")
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_temporaries_sit_beside_the_target_and_differ_per_write(tmp_path):
    path = str(tmp_path / "a.npy")
    with atomic.replacing(path) as one, atomic.replacing(path) as two:
        # two writers of one target (ranks, nodes sharing a cache) never share a temporary file
        assert one != two and all(t.startswith(path) and t.endswith(atomic.TEMPORARY) for t in (one, two))
        atomic.save_npy(one, np.arange(3))
        open(two, "w").close()
    assert np.load(path).tolist() == [0, 1, 2]   # the one renamed last (the outer block's) wins, whole


def test_copy_file_links_only_when_asked(tmp_path):
    source, copied, linked = (str(tmp_path / n) for n in ("source", "copied", "linked"))
    atomic.write_json(source, {"a": 1})
    atomic.copy_file(source, copied)
    atomic.copy_file(source, linked, link=True)
    assert open(copied).read() == open(linked).read() == open(source).read()
    assert os.stat(linked).st_ino == os.stat(source).st_ino != os.stat(copied).st_ino


def test_refusing_makes_a_refused_write_one_line_and_keeps_bugs(tmp_path):
    path = str(tmp_path / "a.txt")
    with pytest.raises(Refused, match=rf"^{path}: cannot write \(No space left on device\); the previous file is kept$"):
        with atomic.refusing(path, Refused):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(Refused, match=r"cannot write \(Read-only file system\)"):   # torch.save's wrapping
        with atomic.refusing(path, Refused):
            try:
                raise OSError(errno.EROFS, "Read-only file system")
            except OSError:
                raise RuntimeError("PytorchStreamWriter failed writing file")
    with pytest.raises(RuntimeError, match="a bug"):
        with atomic.refusing(path, Refused):
            raise RuntimeError("a bug")
