"""What a labeling run (launch/predict.py) labels and at which TTA views: predict.input as a split, a CSV
of paths or a folder of images; predict.scales and predict.mirror, an evaluate run's chosen views
(predict.tta_from), or the image size the model was trained at."""
from __future__ import annotations

import os
import sys

import yaml
from tqdm import tqdm

from data.datasets import SPLITS, Split, read_split
from data.image_folders import OutsideFolderError, image_folder
from data.image_trees import IMAGE_EXTENSIONS
from trainer.runtime import engine, rundir
from trainer.runtime.config import ConfigError
from trainer.runtime.engine import StageError


def read_input(spec: str, data_root: str) -> tuple[Split, list[tuple[str, str]]]:
    """The images predict.input names, as a Split whose paths are root + '/' + the path to write; plus the
    folder's image files it cannot list (always none for a split or CSV)."""
    if spec in SPLITS:
        split, unlisted = read_split(data_root, spec), []
    elif spec.endswith(".csv"):
        if not os.path.isfile(spec):
            raise StageError(f"predict.input={spec}: no such file")
        split, unlisted = read_split(data_root, spec), []
    elif os.path.isdir(spec):
        try:
            split, unlisted = image_folder(spec)
        except OutsideFolderError as e:
            raise StageError(f"predict.input={e}") from None
    else:
        raise StageError(f"predict.input={spec}: expected a split name ({', '.join(SPLITS)}), a CSV file or a folder")
    if len(split) == 0:
        raise StageError(f"predict.input={spec}: no images to label"
                         + (f" ({', '.join(IMAGE_EXTENSIONS)} files)" if os.path.isdir(spec) else ""))
    return split, unlisted


def trained_image_size(model: str) -> int:
    """data.image_size of the config.yaml a stage wrote beside `model`."""
    path = os.path.join(os.path.dirname(os.path.abspath(model)), rundir.CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            size = (yaml.safe_load(f) or {}).get("data", {}).get("image_size")
    except (OSError, yaml.YAMLError, AttributeError):
        size = None
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"predict.scales=[]: {path} does not say which image size {model} was trained at; "
                          "set predict.scales=[PX] (or predict.tta_from)")
    return size


def evaluated_views(tta_from: str, model: str, warn: bool = True) -> tuple[list[int], bool]:
    """The TTA scales and mirrors an evaluate run chose on val (or used, evaluate.tta=all): its eval.json's
    tta_scales and tta_mirror (absent, as before evaluate.mirror: no mirrors)."""
    path = tta_from if os.path.isfile(tta_from) else os.path.join(tta_from, "eval.json")
    key = f"predict.tta_from={tta_from}"
    try:
        result = engine.read_json(path)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path} ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{key}: {path} is not JSON ({e})") from None
    splits = result.get("splits") if isinstance(result, dict) else None
    chosen = (splits.get("val") or next(iter(splits.values()), None)) if isinstance(splits, dict) else None
    scales = chosen.get("tta_scales") if isinstance(chosen, dict) else None
    if scales is None:
        raise ConfigError(f"{key}: {path} records no TTA scales (a kNN evaluation?)")
    if not isinstance(scales, list) or not scales or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in scales):
        raise ConfigError(f"{key}: {path}: tta_scales {scales!r}: expected sizes >= 8 px")
    mirror = chosen.get("tta_mirror", False)
    if not isinstance(mirror, bool):
        raise ConfigError(f"{key}: {path}: tta_mirror {mirror!r}: expected true or false")
    scored = result.get("model", "")   # as evaluate was given it: relative to where it ran, maybe not here
    if (warn and isinstance(scored, str) and os.path.isfile(scored)
            and os.path.realpath(scored) != os.path.realpath(model)):
        tqdm.write(f"warning: {key}: {path} chose its views for {scored}, not {model}", file=sys.stderr)
    return scales, mirror


def check_views(cfg):
    """predict.scales and predict.mirror, or predict.tta_from: not both (a check that reads no file)."""
    p = cfg.predict
    if p.scales and p.tta_from:
        raise ConfigError(f"predict.scales={p.scales}, predict.tta_from={p.tta_from}: give one (tta_from takes the "
                          "scales evaluate chose; predict.tta_from= clears it)")
    if p.mirror and p.tta_from:
        raise ConfigError(f"predict.mirror=true: only without predict.tta_from ({p.tta_from}: its eval.json's "
                          "tta_mirror decides)")


def tta_views(cfg, rt) -> tuple[list[int], bool]:
    """(scales, mirrored): predict.scales and predict.mirror, or tta_from's, or the trained image size."""
    p = cfg.predict
    if p.tta_from:
        return evaluated_views(p.tta_from, p.model, warn=rt.is_main)
    return (list(p.scales) or [trained_image_size(p.model)]), p.mirror
