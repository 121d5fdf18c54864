"""The decode check prepare runs on every image in pool workers: an image the loaders could not
read is left out of the dataset (or stops the run), with the reason."""
from __future__ import annotations

import importlib


def import_decoder():
    """Imports data.datasets (torch: seconds) here, once, so that pool workers forked after this
    inherit it; modules that prepare imports at start leave it out (fashion-mnist does without)."""
    importlib.import_module("data.datasets")


def decode_problem(path: str) -> str | None:
    """A pool worker: why the image at `path` cannot be loaded, None when it can."""
    from data.datasets import BadImageError, load_image   # imported by import_decoder before the pool forks
    try:
        load_image(path)
        return None
    except BadImageError as e:
        return e.reason
