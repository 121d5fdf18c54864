"""A training stage's batch against its data. A training loader drops its last partial batch, so
train.batch_size must fit in the images each loader draws from: checked by the stages' check(cfg), which
the pipeline runs for every stage before its first one, so that a later stage's batch is refused before
the earlier stages spend hours. With train.fit_batch=true a batch the images cannot fill is lowered to
the largest they allow instead, and the stage says so in one line (configs/own: one config for a pile
of any size)."""
from __future__ import annotations

import os

from data.datasets import SPLITS, Split, labeled_with_pseudo_labels, read_split
from trainer.runtime.config import ConfigError


def written_training_split(root: str, labeled: str, pseudo_labels: str) -> tuple[Split | None, str]:
    """The labeled (+ pseudo-labeled) images a training batch is drawn from, as far as their CSVs are written
    now (a pipeline checks its stages before an earlier step writes their inputs): (None when the labeled CSV
    is not written, and a note for a pseudo-label CSV that is not, whose images are then not counted)."""
    if labeled not in SPLITS and not os.path.exists(labeled):
        return None, ""
    if pseudo_labels and not os.path.exists(pseudo_labels):
        return read_split(root, labeled), f", not counting the pseudo-labels of {pseudo_labels} (not written yet)"
    return labeled_with_pseudo_labels(root, labeled, pseudo_labels), ""


def fit(cfg, limits: list[tuple[int, str]], world: int = 1) -> tuple[int, str]:
    """(the global batch to train with, a line saying why it is lower than train.batch_size, else "").
    `limits`: (the largest batch, why) per loader, e.g. (10, "a batch is drawn from the 10 training images
    of labeled"). A larger train.batch_size is refused unless train.fit_batch=true, which takes the largest
    batch every limit allows, a multiple of the `world` ranks (a stage's check passes 1: the pipeline's
    ranks are its own)."""
    wanted = cfg.train.batch_size
    most, why = min(limits)
    if wanted <= most:
        if wanted % world:
            raise ConfigError(f"train.batch_size={wanted}: must divide by {world} rank(s) (global batch)")
        return wanted, ""
    if not cfg.train.fit_batch:
        raise ConfigError(f"train.batch_size={wanted}: expected at most {most}: {why}; lower it, or set "
                          "train.fit_batch=true to train with the largest batch the images allow")
    fitted = most // world * world
    if not fitted:
        raise ConfigError(f"train.batch_size={wanted} (train.fit_batch=true): {why}, too few for a batch of "
                          f"{world} rank(s)")
    return fitted, f"train.batch_size={wanted} lowered to {fitted} (train.fit_batch=true): {why}"
