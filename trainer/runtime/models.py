"""Backbones (torchvision ResNets, a small CPU-friendly net) and the classifier."""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn as nn
import torchvision

from data import datasets
from trainer.runtime import checkpoint

log = logging.getLogger(__name__)


class SmallNet(nn.Module):
    """A 3-stage CNN for small images on CPU; stages named like a ResNet's for feature-map hooks."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layer1 = block(w, 2 * w, 2)
        self.layer2 = block(2 * w, 4 * w, 2)
        self.layer3 = block(4 * w, 8 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 8 * w

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return torch.flatten(self.pool(x), 1)


def build_backbone(name: str, small_stem: bool = False, width: int = 32) -> nn.Module:
    """A feature extractor with `.out_dim`; ResNets keep torchvision's parameter names."""
    if name == "small":
        return SmallNet(width)
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:   # 96 px and below: a 7x7/2 stem plus max-pool throws away most of the image
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def residual_stages(backbone: nn.Module) -> list[str]:
    """Names of the modules whose outputs are the per-stage feature maps."""
    return [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(backbone, n)]


class Classifier(nn.Module):
    """Backbone + linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def save_classifier(model: Classifier, arch: dict, classes: list[str], path: str):
    """model.pt: the weights, what rebuilds the network (backbone name, stem, width, class count) and the
    names of the classes it tells apart (its dataset's classes.txt, as a list of str so that
    torch.load(weights_only=True) reads it): a dataset whose classes merely number the same is refused."""
    checkpoint.save_atomic({"arch": arch, "classes": [str(c) for c in classes], "model": model.state_dict()}, path)


def classifier_arch(model_cfg, num_classes: int) -> dict:
    return {"backbone": model_cfg.backbone, "small_stem": model_cfg.small_stem,
            "width": model_cfg.width, "num_classes": num_classes}


def build_classifier(arch: dict) -> Classifier:
    """The network a classifier_arch describes, randomly initialised."""
    return Classifier(build_backbone(arch["backbone"], arch["small_stem"], arch["width"]), arch["num_classes"])


def load_classifier(path: str, data_root: str | None = None) -> tuple[Classifier, dict]:
    """(the classifier a model.pt holds, its arch); with `data_root`, a model of other classes than
    data_root/classes.txt names (one trained on another dataset) is refused with one line. A model.pt saved
    before the class names were kept is checked on its class count alone, with a warning."""
    state = checkpoint.load(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise checkpoint.CheckpointError(f"{path}: not a semiscale model.pt (expected keys arch, model)")
    arch = state["arch"]
    if not isinstance(arch, dict) or not {"backbone", "small_stem", "width", "num_classes"} <= set(arch):
        raise checkpoint.CheckpointError(f"{path}: not a semiscale model.pt (a training checkpoint? use the "
                                         "model.pt its stage wrote)")
    names = state.get("classes")
    if names is not None and (not isinstance(names, list) or len(names) != arch["num_classes"]
                              or not all(isinstance(n, str) for n in names)):
        raise checkpoint.CheckpointError(f"{path}: not a semiscale model.pt (classes: expected the "
                                         f"{arch['num_classes']} class names, got {names!r:.80})")
    if data_root is not None:
        _check_classes(path, arch["num_classes"], names, data_root)
    model = build_classifier(arch)
    checkpoint.check_architecture(path, checkpoint.architecture_of(state["model"]), model)
    model.load_state_dict(state["model"])
    return model, arch


def _check_classes(path: str, count: int, names: list[str] | None, data_root: str):
    """The model's classes are data_root/classes.txt's, in its order: output i means line i."""
    listed = os.path.join(data_root, "classes.txt")
    classes = datasets.read_classes(data_root)
    if names is None:   # a model.pt from before the names were kept: the count is all there is to check
        if count != len(classes):
            raise checkpoint.CheckpointError(f"{path}: a {count}-class model, but {listed} names {len(classes)} "
                                             "classes")
        log.warning("%s records no class names (saved by an older semiscale): only its class count (%d) is "
                    "checked against %s", path, count, listed)
        return
    if names == classes:
        return
    i = next((i for i, (a, b) in enumerate(zip(names, classes)) if a != b), min(len(names), len(classes)))

    def at(listing):
        return repr(listing[i]) if i < len(listing) else "absent"
    raise checkpoint.CheckpointError(
        f"{path}: a model of other classes than {listed} names: class {i} is {at(names)} in the model, "
        f"{at(classes)} in classes.txt; label a dataset with a model trained on its classes")


BACKBONE_ARCH = "backbone.json"   # next to backbone.pt: what rebuilds the network (backbone.pt stays plain)


def backbone_arch(model_cfg) -> dict:
    return {"backbone": model_cfg.backbone, "small_stem": model_cfg.small_stem, "width": model_cfg.width}


def load_backbone(path: str) -> nn.Module:
    """The network of a backbone.pt (its architecture from the backbone.json beside it) or of a model.pt's
    backbone, with its weights: no stage config repeats the architecture by hand."""
    state = checkpoint.load(path)
    if _is_classifier(state):
        arch = state["arch"]
    else:
        arch_path = os.path.join(os.path.dirname(os.path.abspath(path)), BACKBONE_ARCH)
        try:
            with open(arch_path, encoding="utf-8") as f:
                arch = json.load(f)
        except (OSError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{path}: no readable {BACKBONE_ARCH} beside it ({e}); pretrain writes "
                                             "one, e.g. {\"backbone\": \"resnet50\", \"small_stem\": false, "
                                             "\"width\": 32}") from None
    backbone = build_backbone(arch["backbone"], arch["small_stem"], arch["width"])
    _load_backbone_state(backbone, path, state)
    return backbone


def load_backbone_weights(backbone: nn.Module, path: str):
    """Initialise from backbone.pt (a plain state_dict) or from a model.pt's backbone."""
    _load_backbone_state(backbone, path, checkpoint.load(path))


def _is_classifier(state: dict) -> bool:
    return "arch" in state and "model" in state


def _load_backbone_state(backbone: nn.Module, path: str, state: dict):
    if _is_classifier(state):
        state = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    checkpoint.check_architecture(path, checkpoint.architecture_of(state), backbone)
    backbone.load_state_dict(state)
