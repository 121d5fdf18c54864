import os

import numpy as np
import pytest
from PIL import Image

from slurm_harness.slurm import ClusterUnavailable, SlurmCluster
from tiny import fashion


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small Fashion-MNIST dataset (tiny.fashion) for a test module; a module may define its own `data`."""
    return fashion(tmp_path_factory)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm cluster for this test session (skips with the reason if impossible).
    While it runs, this process's environment points at it, so in-process submitit submits to it."""
    try:
        cluster = SlurmCluster.start()
    except ClusterUnavailable as reason:
        pytest.skip(str(reason))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        try:
            yield cluster
        finally:
            cluster.stop()


# ---- datasets whose geometry can be read back from a view (tests/test_augment.py, tests/test_dali.py) ----

def write_images(root, images):
    """A dataset of lossless PNGs, `images` [(H, W, 3) uint8], every split listing all of them."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("a\nb\n")
    rows = []
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(os.path.join(root, "images", f"{i:02d}.png"))
        rows.append(f"images/{i:02d}.png,{i % 2}\n")
    for name in ("labeled", "val", "test", "unlabeled"):
        with open(os.path.join(root, f"{name}.csv"), "w") as f:
            f.write("path,label\n" + "".join(rows))
    return str(root)


# (height, width) of the ramps: square and not, smaller and larger than the views
RAMP_SHAPES = [(32, 32), (40, 28), (28, 48), (36, 36), (24, 40), (50, 30), (32, 44), (30, 30)]


def ramp(height, width):
    """Grey, brightening left to right from 0 to 60: a mirrored view darkens left to right. Grey, so hue,
    saturation and greyscale leave it as it is; dark, so brightness and contrast jitter never take it to
    solarize's threshold (128)."""
    row = np.round(np.linspace(0, 60, width)).astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], height, axis=0), 3, axis=2)


def grid(size=32):
    """Red = 8 x column, green = 8 x row: a view's pixel says where in the image it was taken from."""
    y, x = np.mgrid[0:size, 0:size]
    return np.dstack([8 * x, 8 * y, np.full_like(x, 128)]).astype(np.uint8)


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("ramps"), [ramp(*shape) for shape in RAMP_SHAPES])


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("grids"), [grid()] * 16)
