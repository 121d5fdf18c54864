"""Atomic checkpoints and safe loading.

A checkpoint is written atomically and durably (data.atomic), so a crash at any moment leaves either the
previous or the new checkpoint, never half.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random

import torch
from data import atomic
from data.errors import InputError

CHECKSUM = "checksum"
log = logging.getLogger(__name__)


class CheckpointError(InputError):
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.refusing(path, CheckpointError), atomic.writing(path, "wb", durable=True) as f:
        torch.save(on_cpu(obj), f)


def load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def digest(obj) -> str:
    """A hash of every tensor's bytes (and of the keys leading to it) in `obj`: torch.load does not notice
    flipped bytes inside a tensor, which would resume into NaNs."""
    h = hashlib.blake2b(digest_size=16)

    def walk(node, key):
        if isinstance(node, torch.Tensor):
            h.update(f"{key}:{node.dtype}:{tuple(node.shape)};".encode())
            h.update(memoryview(node.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(node, dict):
            for k in sorted(node, key=str):
                walk(node[k], f"{key}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}/{i}")
        else:
            h.update(f"{key}={node!r};".encode())

    walk(obj, "")
    return h.hexdigest()


def save_checked(state: dict, path: str):
    """save_atomic with a checksum of the contents; the file it replaces stays as PATH.prev."""
    state = on_cpu(state)
    if os.path.exists(path):
        atomic.copy_file(path, previous(path), link=True)   # checkpoint.pt is only ever replaced
    save_atomic({**state, CHECKSUM: digest(state)}, path)


def previous(path: str) -> str:
    return path + ".prev"


def load_checked(path: str) -> dict:
    """load() of a file written by save_checked, refused with one line when its contents changed since."""
    state = load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a semiscale checkpoint (expected a dict)")
    stored = state.pop(CHECKSUM, None)
    if stored is None:   # written before checkpoints carried one
        log.warning("%s has no checksum: its contents cannot be verified", path)
    elif stored != digest(state):
        fallback = previous(path)
        hint = (f"{fallback} holds the checkpoint before it: move it over {os.path.basename(path)} to resume from "
                "there, or pass --restart" if os.path.exists(fallback) else "pass --restart to start over")
        raise CheckpointError(f"{path}: damaged (its checksum does not match its contents); {hint}")
    return state


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
