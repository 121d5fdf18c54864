"""Fashion-MNIST as the dataset-fashion-mnist Debian package ships it: four gzip IDX files."""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from data.prepare_messages import PrepareError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str) -> np.ndarray:
    """An unsigned-byte IDX array: bytes 0,0,0x08,ndim, then ndim big-endian int32 sizes, then the data.

    Parsed by hand: the format is a dozen bytes of header, not worth a dependency.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"{path}: cannot read a gzip IDX file ({e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise PrepareError(f"{path}: expected an unsigned-byte IDX header (00 00 08 ndim), got {data[:4].hex()}")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise PrepareError(f"{path}: header announces shape {shape} but holds {values.size} values")
    return values.reshape(shape)


def read_fashion_mnist(source: str, limit: int | None = None) -> dict:
    """{"train"|"test": (N x H x W uint8 images, N int64 labels)}, optionally only the first `limit` of each."""
    if not os.path.isdir(source):
        raise PrepareError(f"source {source}: no such directory "
                           "(install the dataset-fashion-mnist package or pass --source)")
    for name in sum(FASHION_MNIST_FILES.values(), ()):
        if not os.path.isfile(os.path.join(source, name)):
            raise PrepareError(f"source {source}: missing {name} (expected the Fashion-MNIST IDX files)")
    parts = {}
    for part, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(os.path.join(source, images_name)), read_idx(os.path.join(source, labels_name))
        if images.ndim != 3 or labels.shape != images.shape[:1] or np.any(labels >= len(FASHION_MNIST_CLASSES)):
            raise PrepareError(f"source {source}: {images_name} {images.shape} and {labels_name} {labels.shape} "
                               f"do not pair as N images with N labels in [0, {len(FASHION_MNIST_CLASSES)})")
        parts[part] = (images[:limit], labels[:limit].astype(np.int64))
    return parts
