"""Typed stage configs: YAML file -> dataclasses, with dotted `key=value` overrides.

Every error (missing file, unknown key, wrong type, value outside its choices) is a ConfigError
whose message is one line naming the key; launch scripts turn it into exit status 2.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key."""


def choice(default, *choices):
    """A str field restricted to `choices`."""
    return field(default=default, metadata={"choices": choices})


# ---- sections shared by every stage (contract: run.dir, run.seed, data.root, data.backend) ----

@dataclass
class RunConfig:
    dir: str = "runs/stage"
    seed: int = 0
    log_every: int = 20             # steps between metrics.jsonl lines / progress refreshes
    checkpoint_every: int = 200     # steps between checkpoint.pt writes (also written every epoch end)
    device: str = choice("auto", "auto", "cuda", "cpu")   # auto: the GPU when torch can use one


@dataclass
class DataConfig:
    root: str = "datasets/fashion-mnist"
    backend: str = choice("auto", "auto", "dali", "torch")
    image_size: int = 28
    workers: int = 2
    on_bad_image: str = choice("error", "error", "skip")


@dataclass
class ModelConfig:
    backbone: str = choice("small", "small", "resnet18", "resnet50")
    small_stem: bool = False        # resnets: 3x3 stride-1 stem without max-pool, for small images
    width: int = 32                 # small net: channels of its first stage


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256           # global: each of N ranks takes batch_size / N
    max_steps: int = 0              # 0 = no cap; a cap for smoke runs and benchmarks
    precision: str = choice("fp32", "fp32", "bf16", "fp16")


@dataclass
class KnnConfig:
    k: int = 20
    temperature: float = 0.07
    every_epochs: int = 1           # 0 = only at the end


# ---- stage configs ----

@dataclass
class BarlowTwinsConfig:
    projector: list[int] = field(default_factory=lambda: [512, 512, 512])
    lambd: float = 0.0051


@dataclass
class LarsConfig:
    impl: str = choice("native", "native", "apex")
    lr_weights: float = 0.2         # per 256 images of global batch
    lr_biases: float = 0.0048
    weight_decay: float = 1.5e-6
    warmup_epochs: float = 10


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: LarsConfig = field(default_factory=LarsConfig)
    barlow: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class SgdConfig:
    lr_backbone: float = 0.05       # as given (not scaled by batch size)
    lr_head: float = 0.05
    weight_decay: float = 0.0       # never applied to biases and norm parameters
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: float = 0


@dataclass
class FinetuneSection:
    init: str = "runs/demo/pretrain/backbone.pt"   # backbone.pt, a model.pt whose backbone is reused, or "" (random init)
    labeled: str = "labeled"        # split name, or a CSV file (path,label) whose image paths are relative to data.root
    pseudo_labels: str = ""         # optional CSV (path,label[,score]) of pseudo-labels, added to labeled
    eval_every: int = 1             # epochs between val evaluations (model.pt keeps the best by val)
    # training view: "train" = random resized crop + flip (photos), "weak" = flip + small translation
    # (FixMatch's weak view: centred objects whose shape is the class, e.g. Fashion-MNIST)
    augment: str = choice("train", "train", "weak")


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: SgdConfig = field(default_factory=SgdConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)


@dataclass
class InferenceConfig:
    batch_size: int = 512           # global
    precision: str = choice("fp32", "fp32", "bf16", "fp16")


@dataclass
class PseudoSection:
    model: str = "runs/demo/finetune/model.pt"     # the model that predicts the first iteration
    top_k: int = 10                 # classes kept per image
    schedule: list[int] = field(default_factory=lambda: [200, 300, 400, 500])   # P per iteration
    finetune_config: str = "configs/demo/finetune.yaml"   # recipe of each iteration's two fine-tunes
    finetune_overrides: list[str] = field(default_factory=list)   # key=value applied to both fine-tunes
    pseudo_epochs: int = 10         # fine-tune on pseudo + labeled
    labeled_epochs: int = 20        # then on labeled only, head re-initialised
    fixmatch_p: int = 16            # also write the (top_k, fixmatch_p) selection for FixMatch; 0 = no
    chunk: int = 65536              # rows per streamed chunk in selection


@dataclass
class PseudolabelConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pseudo: PseudoSection = field(default_factory=PseudoSection)


@dataclass
class FixmatchSection:
    init: str = "runs/demo/pseudolabel/model.pt"   # a model.pt (backbone + head)
    labeled: str = "labeled"        # split name or CSV
    pseudo_labels: str = ""         # CSV of pseudo-labels added to the labeled set (the K=10, P=16 selection)
    mu: int = 7                     # unlabeled batch = mu x labeled batch
    threshold: float = 0.95         # confidence needed for a pseudo-label to count
    lambda_u: float = 1.0           # weight of the unlabeled loss
    ema: float = 0.999              # decay of the weights' average, warmed up as min(ema, (1+t)/(10+t))
    eval_every: int = 1             # epochs (passes over the unlabeled set) between val evaluations
    # Before each evaluation, BatchNorm statistics of the EMA weights from this many clean unlabeled
    # batches (0: keep the live model's, gathered over weak and strong views)
    bn_batches: int = 0


@dataclass
class FixmatchConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)   # batch_size = labeled batch (global)
    optim: SgdConfig = field(default_factory=lambda: SgdConfig(lr_backbone=0.01, lr_head=0.01,
                                                               weight_decay=5e-4, nesterov=True))
    fixmatch: FixmatchSection = field(default_factory=FixmatchSection)


@dataclass
class EvaluateSection:
    model: str = "runs/demo/fixmatch/model.pt"
    scales: list[int] = field(default_factory=lambda: [28, 36])   # px; TTA averages their probabilities
    tta: str = choice("all", "all", "val")   # TTA over all the scales, or over the subset best on val
    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    knn: bool = False               # instead: kNN top-1 of `backbone`'s embeddings (labeled -> each split)
    backbone: str = "runs/demo/pretrain/backbone.pt"
    k: int = 20
    temperature: float = 0.07


@dataclass
class EvaluateConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)     # the backbone's, in knn mode
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)


@dataclass
class ActiveSection:
    model: str = "runs/demo/fixmatch/model.pt"     # its margins pick the queries
    backbone: str = "runs/demo/pretrain/backbone.pt"   # SSL embeddings for the clustering
    labeled: str = "labeled"        # the labels so far (split name or CSV): never queried, kept in labeled.csv
    clusters: int = 200             # at most the number of queries: the budget is split evenly over them
    budget: float = 0.0025          # < 1: fraction of the labeled + unlabeled images; >= 1: a number of queries
    niter: int = 20
    max_points_per_centroid: int = 256   # faiss trains k-means on at most clusters x this many points; 0 = all
    oracle: bool = False            # answer from unlabeled.csv's hidden labels (simulations only)
    answers: str = ""               # an annotator's CSV (path,label) to import instead


@dataclass
class ActiveConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)     # the SSL backbone's
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    active: ActiveSection = field(default_factory=ActiveSection)


@dataclass
class StageSpec:
    config: str = ""                # the stage's YAML
    overrides: list[str] = field(default_factory=list)   # key=value, applied after the pipeline's own


@dataclass
class PipelineSection:
    nproc: int = 1                  # processes per stage: 1 runs inline, more under torchrun
    supervised: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/supervised.yaml"))
    pretrain: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/pretrain.yaml"))
    finetune: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/finetune.yaml"))
    pseudolabel: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/pseudolabel.yaml"))
    fixmatch: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/fixmatch.yaml"))
    active: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/active.yaml"))
    fixmatch_active_overrides: list[str] = field(default_factory=list)   # after fixmatch's, see below
    evaluate: StageSpec = field(default_factory=lambda: StageSpec("configs/demo/evaluate.yaml"))

    @property
    def fixmatch_active(self) -> StageSpec:
        """The FixMatch after active learning: pipeline.fixmatch, then fixmatch_active_overrides."""
        return StageSpec(self.fixmatch.config, [*self.fixmatch.overrides, *self.fixmatch_active_overrides])


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/demo"))
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineSection = field(default_factory=PipelineSection)


# ---- loading ----

def load(cls, path: str | None, overrides: list[str] = ()):
    """Build `cls` from the YAML at `path` (may be None) and `key.sub=value` overrides."""
    tree = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path}: not found")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(tree, key.split("."), value)
    return _build(cls, tree, prefix="")


def _set_dotted(tree: dict, keys: list[str], value):
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def _build(cls, tree, prefix: str, base=None):
    """`base` (default: cls()) with the values in `tree`; sections keep their own defaults."""
    base = cls() if base is None else base
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    values = {}
    for name, value in tree.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value if value is not None else {}, key + ".", getattr(base, name))
            continue
        values[name] = _coerce(key, hint, value)
        allowed = fields[name].metadata.get("choices")
        if allowed and values[name] not in allowed:
            raise ConfigError(f"{key}: {values[name]!r} is not one of {', '.join(map(str, allowed))}")
    return dataclasses.replace(base, **values)


def _coerce(key: str, hint, value):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(t for t in options if t is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]             # `key=5` for a one-item list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)               # e.g. run.dir=2024 stays a path
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg, path: str):
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
