"""Atomic file writes: every file semiscale writes in place of another goes through here.

The new contents go to a temporary file beside the target (the same folder: the same filesystem, where a
rename is atomic), renamed over the target once whole, so that a reader, a crash or a full disk leaves
the old file or the new one, never half of one. Temporary names are `<target>.<8 hex digits>.tmp`: they
differ per write, so that processes writing the same target (ranks, nodes sharing a cache) never write
into one file, and `temporary_target` tells them from a user's own *.tmp files, so that clean-ups
(trainer.runtime.rundir.remove_stray_temporaries, export's) remove only those a killed write left.

Here in data/, the bottom layer, because data/ writes files too and never imports trainer/.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import IO, Iterator

import numpy as np

TEMPORARY = ".tmp"
_TEMPORARY_NAME = re.compile(r"(.+)\.[0-9a-f]{8}" + re.escape(TEMPORARY))


def temporary_target(name: str) -> str | None:
    """The file name that `name` is a temporary of, when `name` is one `replacing` makes; None for any
    other name, *.tmp or not (a user's own)."""
    match = _TEMPORARY_NAME.fullmatch(name)
    return match.group(1) if match else None


@contextlib.contextmanager
def replacing(path: str, durable: bool = False) -> Iterator[str]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block ends,
    removed when it raises. durable: the file and the rename are on the disk before this returns, so that
    a power cut keeps them too (checkpoints, exports: files a crash must not cost)."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}{TEMPORARY}"
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):   # the error that stopped the write is the one to report
            os.remove(tmp)
        raise
    if durable:
        _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: str, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """replacing(path), opened in `mode` ("w": UTF-8 text, written as given: csv.writer's own line ends
    stay; "wb": bytes)."""
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    with replacing(path, durable) as tmp, open(tmp, mode, **text) as f:
        yield f


def write_text(path: str, text: str):
    with writing(path) as f:
        f.write(text)


def write_json(path: str, obj):
    write_text(path, json.dumps(obj, indent=2))


def save_npy(path: str, array: np.ndarray):
    with writing(path, "wb") as f:   # a file object: np.save would append .npy to a name
        np.save(f, array)


def copy_file(source: str, path: str, link: bool = False):
    """`source`'s bytes as `path`. link: as a hard link where the filesystem has them, which costs no copy
    of a large file; only for a source that is itself only ever replaced, never written in place."""
    with replacing(path) as tmp:
        if link:
            try:
                os.link(source, tmp)
                return
            except OSError:   # filesystems without hard links
                pass
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def refusing(path: str, refusal: type[Exception]):
    """A write in the block that the filesystem refuses (a full disk, a read-only folder) raised as
    `refusal`, one line naming `path`. Any other error is a bug and keeps its traceback."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        raise refusal(f"{path}: cannot write ({cause.strerror or cause}); the previous file is kept") from None


def _os_error_in(error: BaseException) -> OSError | None:
    """`error` if it is an OSError, else the OSError a RuntimeError wraps: torch.save's zip writer raises
    its own RuntimeError while closing a file whose write failed."""
    while isinstance(error, RuntimeError):
        error = error.__context__
    return error if isinstance(error, OSError) else None
