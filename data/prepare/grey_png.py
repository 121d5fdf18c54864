"""8-bit greyscale PNGs encoded by hand: at 28 px PIL's per-image overhead costs more than the
encoding itself (docs/results.md, loader)."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_grey_pngs(job) -> int:
    """A pool worker: writes `job` = (N x H x W uint8 images, N paths) as PNGs; returns N."""
    images, paths = job
    n, height, width = images.shape
    rows = np.zeros((n, height, width + 1), np.uint8)   # each PNG row starts with filter type 0 (none)
    rows[:, :, 1:] = images
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    tail = _png_chunk(b"IEND", b"")
    for pixels, path in zip(rows, paths):
        with open(path, "wb") as f:
            f.write(head + _png_chunk(b"IDAT", zlib.compress(pixels.tobytes())) + tail)
    return n


def write_grey_pngs_in(pool, root: str, parts: dict, chunk: int = 2000, rows: dict | None = None) -> tuple[dict, int]:
    """Writes each part's images (name -> N x H x W uint8) as ROOT/images/<part>/<index>.png in `pool`, or
    only those of `rows` (name -> indices: the images a dataset lists, still named by their index);
    returns ({part: the paths relative to ROOT of all its images}, how many were written)."""
    paths, kept = {}, {}
    for part, images in parts.items():
        os.makedirs(os.path.join(root, "images", part))
        paths[part] = png_paths(part, len(images))
        kept[part] = np.arange(len(images)) if rows is None else np.sort(rows[part])
    jobs = [(parts[part][index[i:i + chunk]], [os.path.join(root, p) for p in paths[part][index[i:i + chunk]]])
            for part, index in kept.items() for i in range(0, len(index), chunk)]
    return paths, sum(pool.imap_unordered(write_grey_pngs, jobs))


def png_paths(part: str, n: int) -> np.ndarray:
    """The paths, relative to ROOT, of a part's `n` images as write_grey_pngs_in names them."""
    return np.array([f"images/{part}/{i:05d}.png" for i in range(n)])
