"""Atomic checkpoints and safe loading.

A checkpoint is written to a temporary file in the same folder, fsynced and renamed over the
old one, so a crash at any moment leaves either the previous or the new checkpoint, never half.
"""
from __future__ import annotations

import os
import random
import tempfile

import torch



class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used by this run (one line naming the file)."""


def on_cpu(obj):
    """`obj` with every tensor in it (nested dicts, lists, tuples) copied to the CPU: a file written on a GPU
    node then loads with a plain torch.load on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        copy = type(obj)((k, on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):   # a module state_dict's per-module versions, read by load_state_dict
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def save_atomic(obj, path: str):
    """Write `obj` (its tensors moved to the CPU) so that a crash leaves the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(on_cpu(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def architecture_of(state_dict: dict) -> dict[str, list[int]]:
    """Parameter names and shapes: what must match to load weights into a model."""
    return {k: list(v.shape) for k, v in state_dict.items()}


def check_architecture(path: str, saved: dict, model: torch.nn.Module):
    """Refuse a checkpoint written for another architecture, naming the first mismatch."""
    expected = architecture_of(model.state_dict())
    for name, shape in expected.items():
        if name not in saved:
            raise CheckpointError(f"{path}: written for another architecture (no parameter {name}); "
                                  f"check model.* against the run that wrote it")
        if list(saved[name]) != shape:
            raise CheckpointError(f"{path}: written for another architecture ({name} has shape "
                                  f"{list(saved[name])}, this model needs {shape})")
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: written for another architecture (unexpected parameter {extra[0]})")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
