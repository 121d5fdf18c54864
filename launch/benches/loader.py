"""Input pipelines: DALI vs torchvision DataLoader img/s on two-view Barlow Twins batches.

Both sides get the same files, the same augmentations, the same global batch and 2 worker threads
(DALI: num_threads=2; torch: DataLoader(num_workers=2)). Cases: 96 px JPEGs (smooth random
images) and 28 px greyscale PNGs (Fashion-MNIST when its Debian package is installed).
"""
import os
import tempfile
import time
from unittest import mock

import numpy as np
from PIL import Image

from data.datasets import read_split
from data.loaders import build_loader

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TARGET_RATIO_96PX = 1.5


def _write_layout(root, names):
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("thing\n")
    with open(os.path.join(root, "unlabeled.csv"), "w") as f:
        f.write("path\n" + "".join(f"images/{n}\n" for n in names))


def _jpegs_96px(root, count):
    """Photo-like 96 px JPEGs: upsampled coarse colour fields plus grain (pure noise would not compress)."""
    os.makedirs(os.path.join(root, "images"))
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC)
        grain = rng.integers(-16, 17, (96, 96, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.int64) + grain, 0, 255).astype(np.uint8)
        names.append(f"{i:05d}.jpg")
        Image.fromarray(pixels).save(os.path.join(root, "images", names[-1]), quality=90)
    _write_layout(root, names)


def _pngs_28px(root, count):
    """Fashion-MNIST's first images as 8-bit greyscale PNGs, or blurred random blobs without the package."""
    os.makedirs(os.path.join(root, "images"))
    if os.path.isdir(FASHION_MNIST_DIR):
        from data.prepare.fashion_mnist import read_fashion_mnist
        images = read_fashion_mnist(FASHION_MNIST_DIR, limit=count)["train"][0]
    else:
        rng = np.random.default_rng(0)
        coarse = rng.integers(0, 256, (count, 7, 7), dtype=np.uint8)
        images = [np.asarray(Image.fromarray(c).resize((28, 28), Image.BICUBIC)) for c in coarse]
    names = [f"{i:05d}.png" for i in range(len(images))]
    for pixels, name in zip(images, names):
        Image.fromarray(pixels, "L").save(os.path.join(root, "images", name))
    _write_layout(root, names)


def _img_s(loader, batches):
    """Images per second over `batches` batches after the first (pipeline start-up is not throughput)."""
    seen, images, epoch = 0, 0, 0
    iterator = loader.epoch(epoch)
    next(iterator)
    start = time.perf_counter()
    while seen < batches:
        try:
            batch = next(iterator)
        except StopIteration:
            epoch += 1
            iterator = loader.epoch(epoch)
            continue
        seen += 1
        images += len(batch["index"])
    return images / (time.perf_counter() - start)


def _compare(root, size, batch, batches, repeats):
    split = read_split(root, "unlabeled")
    figures = {"dali": [], "torch": []}
    for _ in range(repeats):   # alternate the two so a neighbour's load hits both alike
        for backend in figures:
            loader = build_loader(split, "barlow_twins", image_size=size, global_batch=batch, workers=2,
                                  backend=backend)
            figures[backend].append(_img_s(loader, batches))
    return {backend: max(values) for backend, values in figures.items()}


def run(args) -> dict:
    count, batches, repeats = (1024, 10, 1) if args.quick else (3072, 40, 2)
    result = {}
    with tempfile.TemporaryDirectory(prefix="semiscale-loader-bench-") as tmp, \
            mock.patch.dict(os.environ, {"SEMISCALE_CACHE": os.path.join(tmp, "cache")}):   # throwaway scans
        for size, make in ((96, _jpegs_96px), (28, _pngs_28px)):
            root = os.path.join(tmp, f"{size}px")
            make(root, count)
            img_s = _compare(root, size, batch=64, batches=batches, repeats=repeats)
            result[f"bt_{size}px_dali_img_s"] = img_s["dali"]
            result[f"bt_{size}px_torch_img_s"] = img_s["torch"]
            result[f"bt_{size}px_ratio"] = img_s["dali"] / img_s["torch"]
    result["target_ratio_96px"] = TARGET_RATIO_96PX
    result["target_met"] = float(result["bt_96px_ratio"] >= TARGET_RATIO_96PX)
    return result
