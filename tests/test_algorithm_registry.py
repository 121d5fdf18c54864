"""Algorithms plug in by name: this file registers a toy semi-supervised algorithm and a toy self-supervised
method of its own, and the unchanged stages (launch/fixmatch.py, launch/pretrain.py) train them when the
config names them, a killed run resuming the toy's own state like the rest.

Run as a script, this file is launch/STAGE.py with the toys registered:
    python tests/test_algorithm_registry.py STAGE --config ... key=value ...
"""
import importlib
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.errors import InputError
from tiny import ENV, ROOT, assert_same_weights, fashion, stage, tiny_classifier
from trainer.algorithms import self_supervised
from trainer.algorithms.fixmatch import FixMatch, FlexMatch, FreeMatch, SoftMatch
from trainer.algorithms.semi_supervised import ALGORITHMS, Algorithm, SemiSupervisedLoss, Setup, register
from trainer.runtime import amp, checkpoint, config, engine
from trainer.runtime.config import ConfigError, FixmatchConfig
from trainer.dist import Runtime

CPU = torch.device("cpu")
TOYS = os.path.abspath(__file__)
# in the toy's first run, its step of this number SIGKILLs the process: a crash at a known point
DIE_AT_STEP = "TOY_DIE_AT_STEP"


# ---- the toys ----

class StepCounter:
    """The toy's own resumable state: how many steps it has taken."""

    def __init__(self, device: torch.device):
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def state_dict(self) -> dict:
        return {"count": self.count.clone()}

    def load_state_dict(self, state: dict):
        self.count.copy_(state["count"])


@register("toy_argmax")
class ArgmaxPseudoLabels(Algorithm):
    """Every unlabeled image's pseudo-label is its weak view's argmax, weight 1: no threshold."""

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.steps = StepCounter(setup.rt.device)
        self.state["toy_steps"] = self.steps

    def loss(self, logits_labeled, labels, logits_weak, logits_strong, index) -> SemiSupervisedLoss:
        if self.steps.count.item() == int(os.environ.get(DIE_AT_STEP, -1)):
            os.kill(os.getpid(), signal.SIGKILL)
        self.steps.count += 1
        supervised = F.cross_entropy(logits_labeled.float(), labels)
        pseudo_labels = logits_weak.detach().argmax(dim=1)
        unsupervised = F.cross_entropy(logits_strong.float(), pseudo_labels)
        return SemiSupervisedLoss(supervised + unsupervised, supervised, unsupervised, pseudo_labels,
                                  torch.ones_like(pseudo_labels, dtype=torch.float32))


class Agreement(nn.Module):
    """A toy self-supervised loss: the squared distance between the two views' unit embeddings."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, view1, view2):
        z1, z2 = (F.normalize(self.backbone(v).float(), dim=1) for v in (view1, view2))
        return (z1 - z2).pow(2).sum(dim=1).mean()


self_supervised.register("toy_agreement")(self_supervised.Method(
    views="barlow_twins", build=lambda backbone, cfg, global_batch: Agreement(backbone)))


# ---- the registry and the config ----

def setup_for(*overrides) -> Setup:
    cfg = config.load(FixmatchConfig, None, ["data.root=d", "fixmatch.model=m", *overrides])
    model = nn.Linear(4, 3)
    return Setup(cfg, Runtime(), model, torch.optim.SGD(model.parameters(), lr=0.1), amp.grad_scaler("fp32", CPU),
                 "fp32", num_classes=3, num_unlabeled=20, hidden_labels=None)


def test_the_variants_are_registered_algorithms_with_their_pseudo_labelers():
    for name, labeler in {"fixmatch": FixMatch, "flexmatch": FlexMatch, "freematch": FreeMatch,
                          "softmatch": SoftMatch}.items():
        for alignment in (False, True):
            algorithm = ALGORITHMS[name](setup_for(f"fixmatch.variant={name}", "fixmatch.threshold=0.7",
                                                   f"fixmatch.distribution_alignment={alignment}"))
            assert type(algorithm.pseudo_labeler) is labeler
            assert (algorithm.pseudo_labeler.alignment is not None) == alignment
            assert getattr(algorithm.pseudo_labeler, "threshold", 0.7) == 0.7   # fixmatch.threshold, where used
            assert set(algorithm.state) == {"ema", "epoch_sums", "pseudo_labeler"}


def test_running_statistics_move_with_momentum_0999():
    """Every running statistic moves at 0.999; SoftMatch starts from mu = 1/C, var = 1."""
    probs = np.array([[0.90, 0.05, 0.05], [0.20, 0.60, 0.20], [0.25, 0.25, 0.50], [0.40, 0.30, 0.30]])
    labeler = ALGORITHMS["softmatch"](setup_for("fixmatch.distribution_alignment=true")).pseudo_labeler
    labeler(torch.tensor(np.log(probs), dtype=torch.float32))
    p_model = 0.999 / 3 + 0.001 * probs.mean(0)
    aligned = probs / p_model
    confidence = (aligned / aligned.sum(1, keepdims=True)).max(1)
    state = labeler.state_dict()
    np.testing.assert_allclose(state["alignment"]["p_model"].numpy(), p_model, rtol=1e-6)
    assert state["mu"].item() == pytest.approx(0.999 / 3 + 0.001 * confidence.mean(), rel=1e-6)
    assert state["var"].item() == pytest.approx(0.999 + 0.001 * confidence.var(ddof=1), rel=1e-6)


def test_the_config_takes_the_registered_names():
    assert config.load(FixmatchConfig, None, ["data.root=d", "fixmatch.model=m",
                                              "fixmatch.variant=toy_argmax"]).fixmatch.variant == "toy_argmax"
    with pytest.raises(ConfigError, match="^fixmatch.variant: 'mixmatch' is not one of fixmatch, flexmatch, "
                                          "freematch, softmatch, .*toy_argmax"):
        setup_for("fixmatch.variant=mixmatch")
    with pytest.raises(InputError, match="^fixmatch.variant='mixmatch': expected one of fixmatch, flexmatch"):
        ALGORITHMS["mixmatch"]
    assert "toy_agreement" in self_supervised.METHODS
    assert "pretrain.method = barlow_twins  (one of barlow_twins, toy_agreement" in config.keys_help(
        config.PretrainConfig)


# ---- the stages train the toys ----

def with_toys(name: str, *args, **kw):
    """launch/<name>.py, run with this file's toys registered."""
    return stage(name, name, *args, script=TOYS, **kw)


def test_a_registered_algorithm_trains_is_killed_and_resumes(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    init = tmp_path / "init.pt"
    tiny_classifier(data, init)
    args = ["--config", os.path.join(ROOT, "configs", "demo", "fixmatch.yaml"), f"data.root={data}",
            f"fixmatch.model={init}", "fixmatch.variant=toy_argmax", "fixmatch.pseudo_labels=", "train.batch_size=8",
            "fixmatch.mu=2", "train.max_steps=3", "run.checkpoint_every=1", "run.log_every=1", "data.backend=torch",
            "data.workers=0", "train.precision=fp32", "fixmatch.bn_batches=0"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with_toys("fixmatch", *args, f"run.dir={straight}")

    died = with_toys("fixmatch", *args, f"run.dir={killed}", check=False, env={**ENV, DIE_AT_STEP: "2"})
    assert died.returncode == -signal.SIGKILL
    saved = checkpoint.load(str(killed / "checkpoint.pt"))
    assert saved["step"] == 2 and saved["state"]["toy_steps"]["count"].item() == 2
    assert not (killed / "model.pt").exists()

    resumed = with_toys("fixmatch", *args, f"run.dir={killed}")
    assert f"resumed from {killed / 'checkpoint.pt'} at step 2" in resumed.stdout + resumed.stderr
    final = checkpoint.load(str(killed / "checkpoint.pt"))
    assert final["step"] == 3
    assert final["state"]["toy_steps"]["count"].item() == 3   # restored at 2, then one more step
    assert final["state"]["ema"]["updates"] == 3
    events = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    assert [e["step"] for e in events if "lr" in e] == [1, 2, 3]
    assert [e["mask_rate"] for e in events if "lr" in e] == [1.0, 1.0, 1.0]   # the toy's weights, every step
    assert events[-1]["event"] == "done"
    straight_model = torch.load(straight / "model.pt", weights_only=True)["model"]
    assert_same_weights(torch.load(killed / "model.pt", weights_only=True)["model"], straight_model, atol=1e-6)
    assert_same_weights(final["state"]["model"], checkpoint.load(str(straight / "checkpoint.pt"))["state"]["model"],
                        atol=1e-6)


def test_a_registered_self_supervised_method_pretrains(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    with_toys("pretrain", "--config", os.path.join(ROOT, "configs", "demo", "pretrain.yaml"), f"data.root={data}",
              f"run.dir={tmp_path}", "pretrain.method=toy_agreement", "model.width=8", "train.batch_size=16",
              "train.max_steps=2", "train.precision=fp32", "data.backend=torch", "data.workers=0",
              "knn.every_epochs=0", "run.log_every=1")
    model = checkpoint.load(str(tmp_path / "checkpoint.pt"))["state"]["model"]
    assert all(key.startswith("backbone.") for key in model)   # the toy's model: no projector
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 2 and all(0 <= loss <= 4 for loss in losses)   # squared distances of unit vectors
    assert (tmp_path / "backbone.pt").exists()


if __name__ == "__main__":
    engine.cli(importlib.import_module(f"launch.{sys.argv.pop(1)}").main)
