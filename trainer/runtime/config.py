"""Typed stage configs: YAML file -> dataclasses, with dotted `key=value` overrides.

Every error (missing file, unknown key, wrong type, value outside its choices or its range, NaN or
infinity) is a ConfigError whose message is one line naming the key; launch scripts turn it into exit
status 2. Every number declares its range next to its key (`number`, `nonempty`) and is checked at
load time, defaults included, so a stage never starts work with a value it cannot use. Ranges that
depend on the data (e.g. k <= the number of labeled images) are left to the stage.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml
from data.errors import InputError


class ConfigError(InputError):
    """A config problem, reported as one line naming the key."""


def choice(default, *choices):
    """A str field restricted to `choices`."""
    return field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class Bounds:
    """The range of a number: low..high, each end included or not."""
    text: str                       # as error messages write it: ">= 1", "in [0, 1)"
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> Bounds:
        """">= a", "> a", or an interval "[a, b]", "[a, b)", "(a, b]", "(a, b)"."""
        if m := re.fullmatch(r"(>=?) *([-+.\de]+)", spec):
            return cls(spec, float(m[2]), low_open=m[1] == ">")
        if m := re.fullmatch(r"([\[(]) *([-+.\de]+) *, *([-+.\de]+) *([\])])", spec):
            return cls(f"in {spec}", float(m[2]), float(m[3]), low_open=m[1] == "(", high_open=m[4] == ")")
        raise InputError(f"bounds {spec!r}: expected '>= a', '> a' or an interval such as '[a, b)'")

    def __contains__(self, x) -> bool:
        return ((self.low < x if self.low_open else self.low <= x)
                and (x < self.high if self.high_open else x <= self.high))


def number(default, bounds: str):
    """An int or float field whose value must lie in `bounds` (see Bounds.parse): ">= 1", "[0, 1)"."""
    return field(default=default, metadata={"bounds": Bounds.parse(bounds)})


def path(help: str, required: bool = True):
    """A file path; a required one has no default (`""`): a stage names its inputs in its config, so
    no run reads another's output by accident."""
    return field(default="", metadata={"required": help} if required else {})


def nonempty(default: list, bounds: str | None = None):
    """A list field that needs at least one item; numeric items must lie in `bounds`."""
    metadata = {"nonempty": True} | ({"bounds": Bounds.parse(bounds)} if bounds else {})
    return field(default_factory=lambda: list(default), metadata=metadata)


# ---- sections shared by every stage (contract: run.dir, run.seed, data.root, data.backend) ----

@dataclass
class RunConfig:
    dir: str = "runs/stage"
    seed: int = number(0, "[0, 2147483647]")      # faiss's k-means (active) takes it as a C int
    log_every: int = number(20, ">= 1")           # steps between metrics.jsonl lines / progress refreshes
    checkpoint_every: int = number(200, ">= 1")   # steps between checkpoint.pt writes (also written every epoch end)
    device: str = choice("auto", "auto", "cuda", "cpu")   # auto: the GPU when torch can use one
    restart: bool = False           # --restart: move a previous run in run.dir aside (to replaced/) and start over


@dataclass
class AugmentConfig:
    """data.augment: what the training views' augmentations do, the same on the torchvision and DALI
    backends (data.transforms.Augment, whose defaults these are: the recipe's)."""
    flip: bool = True   # horizontal flip, p=0.5, in every training view; false for digits, text, documents
    # weak and strong views: shift by up to this fraction of the side (reflect padding); 0 = none
    translate: float = number(0.125, "[0, 0.5]")
    crop_min_scale: float = number(0.25, "(0, 1]")   # train view: the random resized crop keeps >= this of the area
    rand_augment_ops: int = number(2, "[0, 14]")     # strong view: RandAugment ops per image; 0 = none
    # strong view: RandAugment magnitude ~ U{1..this} per image; 10 = each op's full range
    rand_augment_magnitude: int = number(10, "[1, 10]")
    # strong view: one square of side up to this fraction of the image (its area 8%-100% of the largest
    # square's), filled with the mean colour; 0 = none
    cutout: float = number(0.5, "[0, 0.9]")


@dataclass
class DataConfig:
    root: str = path("a prepared dataset folder (launch/prepare.py)")
    backend: str = choice("auto", "auto", "dali", "torch")
    image_size: int = number(28, ">= 8")   # px; three stride-2 stages leave 1 px of an 8 px image
    workers: int = number(2, ">= 0")       # loader processes; 0 = load in the training process
    on_bad_image: str = choice("error", "error", "skip")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    backbone: str = choice("small", "small", "resnet18", "resnet50")
    small_stem: bool = False        # resnets: 3x3 stride-1 stem without max-pool, for small images
    width: int = number(32, ">= 1")   # small net: channels of its first stage


@dataclass
class TrainConfig:
    epochs: int = number(10, ">= 1")
    batch_size: int = number(256, ">= 1")   # global: each of N ranks takes batch_size / N
    max_steps: int = number(0, ">= 0")      # 0 = no cap; a cap for smoke runs and benchmarks
    # auto: bf16 on a GPU; on a CPU the faster of fp32 and bf16 for this model and batch, measured at start
    precision: str = choice("fp32", "fp32", "bf16", "fp16", "auto")
    # What a training stage does when a loss is not finite: stop with one line naming the step, or
    # skip that step's update (counted and logged), so that one bad batch (e.g. an fp16 overflow)
    # need not end a long run.
    on_nan: str = choice("stop", "stop", "skip")


@dataclass
class KnnConfig:
    k: int = number(20, ">= 1")                  # at most the labeled images: checked by the stage
    temperature: float = number(0.07, "> 0")     # divides the similarities
    every_epochs: int = number(1, ">= 0")        # 0 = only at the end


# ---- stage configs ----

@dataclass
class BarlowTwinsConfig:
    projector: list[int] = nonempty([512, 512, 512], ">= 1")   # layer widths; the last is the embedding's
    lambd: float = number(0.0051, ">= 0")   # weight of the off-diagonal (redundancy) term


@dataclass
class LarsConfig:
    impl: str = choice("native", "native", "apex")
    # learning rates per 256 images: the run uses lr x train.batch_size / 256 (global batch)
    lr_weights: float = number(0.2, ">= 0")
    lr_biases: float = number(0.0048, ">= 0")
    weight_decay: float = number(1.5e-6, ">= 0")
    warmup_epochs: float = number(10, ">= 0")


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lars: LarsConfig = field(default_factory=LarsConfig)
    barlow: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    RETIRED = {"optim": "renamed lars (learning rates per 256 images of global batch)"}


@dataclass
class SgdConfig:
    # learning rates as given, whatever train.batch_size is (not scaled by batch size); 0 = frozen
    lr_backbone: float = number(0.05, ">= 0")
    lr_head: float = number(0.05, ">= 0")
    weight_decay: float = number(0.0, ">= 0")     # never applied to biases and norm parameters
    momentum: float = number(0.9, "[0, 1)")       # 1 would never forget a gradient
    nesterov: bool = False
    warmup_epochs: float = number(0, ">= 0")


@dataclass
class FinetuneSection:
    # backbone.pt, a model.pt whose backbone is reused, or "random" (random init: the supervised baseline)
    backbone: str = path("backbone.pt, a model.pt whose backbone is reused, or random")
    labeled: str = "labeled"        # split name, or a CSV file (path,label) whose image paths are relative to data.root
    pseudo_labels: str = ""         # optional CSV (path,label[,score]) of pseudo-labels, added to labeled
    eval_every: int = number(1, ">= 1")   # epochs between val evaluations (model.pt keeps the best by val)
    # training view: "train" = random resized crop + flip (photos), "weak" = flip + small translation
    # (FixMatch's weak view: centred objects whose shape is the class, e.g. Fashion-MNIST)
    augment: str = choice("train", "train", "weak")
    RETIRED = {"init": "renamed finetune.backbone (a path, or random)"}


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sgd: SgdConfig = field(default_factory=SgdConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    RETIRED = {"optim": "renamed sgd (learning rates as given, not scaled by batch size)"}


@dataclass
class InferenceConfig:
    batch_size: int = number(512, ">= 1")   # global
    precision: str = choice("fp32", "fp32", "bf16", "fp16")


@dataclass
class PseudoSection:
    model: str = path("the model.pt that predicts the first iteration")
    top_k: int = number(10, ">= 1")   # classes kept per image (at most the classes: checked by the stage)
    # P per iteration, images per class: < 1 is a fraction of the unlabeled images per class (rounded, at
    # least 1), so that a config carries over to a dataset of another size; >= 1 is a whole number of images
    schedule: list[float] = nonempty([200, 300, 400, 500], "> 0")
    finetune_config: str = path("the fine-tune config of each iteration's two fine-tunes")
    finetune_overrides: list[str] = field(default_factory=list)   # key=value applied to both fine-tunes
    pseudo_epochs: int = number(10, ">= 1")    # fine-tune on pseudo + labeled
    # true: each iteration's fine-tune on pseudo + labeled starts from pseudo.backbone with a fresh head
    # (Curriculum Labeling's re-initialisation: a model's errors are not carried into the next round);
    # false: from the model before it
    reinitialise: bool = False
    backbone: str = path("the pretrained backbone.pt that pseudo.reinitialise=true starts each iteration from",
                         required=False)
    labeled_epochs: int = number(20, ">= 1")   # then on labeled only, head re-initialised
    # also write the (top_k, fixmatch_p) selection for FixMatch; 0 = no; P as in schedule (< 1: a fraction)
    fixmatch_p: float = number(16, ">= 0")
    chunk: int = number(65536, ">= 1")         # rows per streamed chunk in selection
    # what ranks an image for a class: the model's softmax (classifier), label propagation over the kNN
    # graph of the model's embeddings from the labeled images (propagation, section propagation), or
    # the mean of the two distributions (mean)
    scorer: str = choice("classifier", "classifier", "propagation", "mean")
    # class-adaptive P: a class keeps P x (its selection's mean score / the most confident class's)
    class_adaptive: bool = False

    def __post_init__(self):
        """A P of 1 or more is a number of images: whole (2.5 is neither a fraction nor a count)."""
        for key, p in [*((f"pseudo.schedule[{i}]", p) for i, p in enumerate(self.schedule)),
                       ("pseudo.fixmatch_p", self.fixmatch_p)]:
            if isinstance(p, (int, float)) and math.isfinite(p) and p >= 1 and p != int(p):
                raise ConfigError(f"{key}={p}: expected a fraction < 1 or a whole number of images")


@dataclass
class PropagationConfig:
    k: int = number(20, ">= 1")                    # neighbours per image in the graph
    alpha: float = number(0.99, "[0, 1)")          # how far labels spread: Z = (I - alpha W)^-1 Y
    iterations: int = number(20, ">= 1")           # conjugate-gradient steps
    gamma: float = number(3.0, "> 0")              # edge weight = similarity^gamma


@dataclass
class PseudolabelConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pseudo: PseudoSection = field(default_factory=PseudoSection)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)


@dataclass
class FixmatchSection:
    model: str = path("the model.pt (backbone + head) FixMatch starts from")
    labeled: str = "labeled"        # split name or CSV
    pseudo_labels: str = ""         # CSV of pseudo-labels added to the labeled set (the K=10, P=16 selection)
    mu: int = number(7, ">= 1")                   # unlabeled batch = mu x labeled batch
    # which images' pseudo-labels count, and how much: fixmatch (a fixed threshold), flexmatch (class-wise
    # thresholds from each class's learning status), freematch (self-adaptive global and class thresholds),
    # softmatch (a truncated-Gaussian weight of the confidence); trainer/algorithms/fixmatch.py has each formula
    variant: str = choice("fixmatch", "fixmatch", "flexmatch", "freematch", "softmatch")
    # weak-view probabilities x (uniform / running mean of the predictions), renormalised, before the variant
    distribution_alignment: bool = False
    threshold: float = number(0.95, "(0, 1]")     # fixmatch, flexmatch: confidence needed for a pseudo-label
    lambda_u: float = number(1.0, ">= 0")         # weight of the unlabeled loss
    ema: float = number(0.999, "[0, 1)")          # decay of the weights' average, warmed up as min(ema, (1+t)/(10+t))
    eval_every: int = number(1, ">= 1")           # epochs (passes over the unlabeled set) between val evaluations
    # Before each evaluation, BatchNorm statistics of the EMA weights from this many clean unlabeled
    # batches (0: keep the live model's, gathered over weak and strong views)
    bn_batches: int = number(0, ">= 0")
    RETIRED = {"init": "renamed fixmatch.model"}


@dataclass
class FixmatchConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)   # batch_size = labeled batch (global)
    sgd: SgdConfig = field(default_factory=lambda: SgdConfig(lr_backbone=0.01, lr_head=0.01,
                                                             weight_decay=5e-4, nesterov=True))
    fixmatch: FixmatchSection = field(default_factory=FixmatchSection)
    RETIRED = {"optim": "renamed sgd (learning rates as given, not scaled by batch size)"}


@dataclass
class EvaluateSection:
    # What is scored is what is given (at least one): a model.pt -> top-1/top-5 per scale and with
    # TTA; a backbone.pt -> kNN top-1 of its embeddings with the labeled images as references.
    model: str = path("a model.pt", required=False)
    scales: list[int] = nonempty([28, 36], ">= 8")   # px, as data.image_size; TTA averages their probabilities
    tta: str = choice("all", "all", "val")   # TTA over all the scales, or over the subset best on val
    # also try each TTA candidate with its views' horizontal mirrors added (tta=all: always add them)
    mirror: bool = False
    splits: list[str] = nonempty(["val", "test"])
    backbone: str = path("a backbone.pt", required=False)
    RETIRED = {"knn": "kNN scores are computed when evaluate.backbone is given, TTA scores when evaluate.model is"}
    k: int = number(20, ">= 1")                # at most the labeled images: checked by the stage
    temperature: float = number(0.07, "> 0")


@dataclass
class EvaluateConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    RETIRED = {"model": "the backbone's architecture is read from backbone.json next to evaluate.backbone; "
                        "drop the model section"}


@dataclass
class ActiveSection:
    model: str = path("the model.pt whose margins pick the queries")
    backbone: str = path("the backbone.pt whose embeddings are clustered")
    labeled: str = "labeled"        # the labels so far (split name or CSV): never queried, kept in labeled.csv
    # the budget is split evenly over them; a budget of fewer queries gets that many clusters (said in one line)
    clusters: int = number(200, ">= 1")
    budget: float = number(0.0025, "> 0")   # < 1: fraction of the labeled + unlabeled images; >= 1: a number of queries
    niter: int = number(20, ">= 1")         # k-means iterations
    # faiss trains k-means on at most clusters x this many points; 0 = all
    max_points_per_centroid: int = number(256, ">= 0")
    oracle: bool = False            # answer from unlabeled.csv's hidden labels (simulations only)
    answers: str = ""               # an annotator's CSV (path,label) to import instead


@dataclass
class ActiveConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    active: ActiveSection = field(default_factory=ActiveSection)
    RETIRED = {"model": "the backbone's architecture is read from backbone.json next to active.backbone; "
                        "drop the model section"}


@dataclass
class PredictSection:
    model: str = path("the model.pt that labels the images (or the run dir that holds it)")
    # what to label: a split name (labeled, val, test, unlabeled), a CSV with a path column (paths
    # relative to data.root) or a folder (every image in its tree)
    input: str = "unlabeled"
    # TTA sizes (px): the mean softmax over the image's views at these sizes; [] = tta_from's, or else
    # the size the model was trained at (data.image_size of the config.yaml beside model.pt)
    scales: list[int] = field(default_factory=list, metadata={"bounds": Bounds.parse(">= 8")})
    tta_from: str = ""     # an evaluate run dir or its eval.json: the scales (and mirrors) it chose on val
    mirror: bool = False   # each view's horizontal mirror too (with tta_from, eval.json's tta_mirror decides)
    chunk_size: int = number(16384, ">= 1")   # rows per resumable chunk
    top_k: int = number(5, ">= 1")            # classes written per image (at most the classes)


@dataclass
class PredictConfig:
    run: RunConfig = field(default_factory=RunConfig)
    # skip: unreadable images are listed in bad_images.txt; error: stop at the first chunk holding one
    data: DataConfig = field(default_factory=lambda: DataConfig(on_bad_image="skip"))
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    predict: PredictSection = field(default_factory=PredictSection)


@dataclass
class StageSpec:
    config: str = path("the stage's YAML config")
    overrides: list[str] = field(default_factory=list)   # key=value, applied after the pipeline's own


@dataclass
class PipelineSection:
    nproc: int = number(1, ">= 1")   # processes per stage: 1 runs inline, more under torchrun
    supervised: StageSpec = field(default_factory=StageSpec)
    pretrain: StageSpec = field(default_factory=StageSpec)
    finetune: StageSpec = field(default_factory=StageSpec)
    pseudolabel: StageSpec = field(default_factory=StageSpec)
    fixmatch: StageSpec = field(default_factory=StageSpec)
    active: StageSpec = field(default_factory=StageSpec)
    fixmatch_active_overrides: list[str] = field(default_factory=list)   # after fixmatch's, see below
    evaluate: StageSpec = field(default_factory=StageSpec)
    predict: StageSpec = field(default_factory=StageSpec)   # labels the unlabeled pile with the final model
    # false: no active learning (stages active, fixmatch_active and its evaluation); FixMatch's model is final
    active_learning: bool = True
    # who answers active learning's queries: true = unlabeled.csv's hidden labels (simulations: the demo);
    # false = you: the pipeline stops once run.dir/active/queries.csv is written, and continues when rerun
    # with `answers`
    oracle: bool = True
    answers: str = ""   # your labels for run.dir/active/queries.csv: a CSV path,label (label: a class name or id)

    @property
    def fixmatch_active(self) -> StageSpec:
        """The FixMatch after active learning: pipeline.fixmatch, then fixmatch_active_overrides."""
        return StageSpec(self.fixmatch.config, [*self.fixmatch.overrides, *self.fixmatch_active_overrides])


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineSection = field(default_factory=PipelineSection)


# the config each launch/ stage script reads
STAGE_CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "pseudolabel": PseudolabelConfig,
                 "fixmatch": FixmatchConfig, "active": ActiveConfig, "evaluate": EvaluateConfig,
                 "predict": PredictConfig, "pipeline": PipelineConfig}


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
    retired = [key for key in unknown if key in getattr(cls, "RETIRED", {})]
    if retired:   # a key older configs have: say what replaced it
        raise ConfigError(f"{prefix}{retired[0]}: {cls.RETIRED[retired[0]]}")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():   # every field, not only those given: defaults are checked too
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            section = tree.get(name)
            values[name] = _build(hint, section if section is not None else {}, key + ".", getattr(base, name))
            continue
        value = _coerce(key, hint, tree[name]) if name in tree else getattr(base, name)
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        _check_range(key, hint, value, f.metadata)
        if value == "" and "required" in f.metadata:
            raise ConfigError(f"{key}: required: {f.metadata['required']}")
        values[name] = value
    return dataclasses.replace(base, **values)


_KINDS = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers")}


def _check_range(key: str, hint, value, metadata):
    """Numbers (a list's items too) finite and within the field's bounds; a `nonempty` list not empty."""
    bounds = metadata.get("bounds")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if metadata.get("nonempty") and not value:
            of = f" of {_KINDS[item][1]} {bounds.text}" if bounds else ""
            raise ConfigError(f"{key}=[]: expected a non-empty list{of}")
        for i, v in enumerate(value):
            _check_number(f"{key}[{i}]", item, v, bounds)
    else:
        _check_number(key, hint, value, bounds)


def _check_number(key: str, hint, value, bounds: Bounds | None):
    if hint not in _KINDS:
        return
    if (hint is float and not math.isfinite(value)) or (bounds and value not in bounds):
        expected = _KINDS[hint][0] + (f" {bounds.text}" if bounds else "")
        raise ConfigError(f"{key}={value}: expected {expected}")


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
    if hint is float and isinstance(value, str):
        try:
            return float(value)         # YAML 1.1 reads 1e-4, nan and inf as text
        except ValueError:
            pass                        # not a number: the type error below
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)               # e.g. run.dir=2024 stays a path
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dumps(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg, path: str):
    with open(path, "w") as f:
        f.write(dumps(cfg))
