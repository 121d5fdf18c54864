"""The decode check prepare runs on every image in pool workers: an image the loaders could not
read is left out of the dataset (or stops the run), with the reason; one they can read leaves the
digest of its pixels, by which data.prepare.same_pictures finds one picture under two names."""
from __future__ import annotations

import hashlib
import importlib


def import_decoder():
    """Imports data.datasets (torch: seconds) here, once, so that pool workers forked after this
    inherit it; modules that prepare imports at start leave it out (fashion-mnist does without)."""
    importlib.import_module("data.datasets")


def decode_check(path: str) -> tuple[str | None, bytes]:
    """A pool worker: (why the image at `path` cannot be loaded, b"") or (None, the 16-byte digest of its
    size and RGB pixels as the loaders see them: the same for a copy, and for a lossless re-encoding)."""
    from data.datasets import BadImageError, load_image   # imported by import_decoder before the pool forks
    try:
        image = load_image(path)
    except BadImageError as e:
        return e.reason, b""
    return None, pixel_digest(image.size, image.tobytes())


def pixel_digest(size: tuple[int, int], rgb: bytes) -> bytes:
    """The 16-byte digest of a picture: its (width, height) and its RGB pixels, row by row (what
    Image.tobytes() gives; fashion-mnist digests its grey arrays so, widened to RGB, without a decode)."""
    digest = hashlib.sha256(b"%dx%d:" % size)
    digest.update(rgb)   # sha256: twice blake2b's speed where the CPU has SHA instructions
    return digest.digest()[:16]
