"""The stage configs, declared once: every key with its type, default, range or choices, and its comment.

The comment beside a field (trailing, or on the lines just above) and a section class's docstring are
what `python launch/STAGE.py --help` prints for it (trainer.runtime.config_fields.keys_help reads them
from here): write them for the person setting the key. How a file and `key=value` overrides become one
of these classes, and what makes a value refused, is trainer.runtime.config_fields; its loader and
error are used through this module (`config.load`, `config.ConfigError`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.runtime.registry import SELF_SUPERVISED, SEMI_SUPERVISED
from trainer.runtime.tracking import BACKENDS as TRACKERS
from trainer.runtime.config_fields import Bounds, ConfigError, choice, counts, fractions, nonempty, number, path
# the stages load, dump and describe their configs through this module
from trainer.runtime.config_fields import dumps, keys_help, load, to_dict  # noqa: F401 (re-exported)


# ---- sections shared by every stage (contract: run.dir, run.seed, data.root, data.backend) ----

@dataclass
class RunConfig:
    dir: str = "runs/stage"   # where the run writes config.yaml, metrics.jsonl, checkpoint.pt and its outputs
    seed: int = number(0, "[0, 2147483647]")      # faiss's k-means (active) takes it as a C int
    log_every: int = number(20, ">= 1")           # steps between metrics.jsonl lines / progress refreshes
    checkpoint_every: int = number(200, ">= 1")   # steps between checkpoint.pt writes (and one at the run's end)
    device: str = choice("auto", "auto", "cuda", "cpu")   # auto: the GPU when torch can use one
    restart: bool = False           # --restart: move a previous run in run.dir aside (to replaced/) and start over
    # where the metrics go: metrics.jsonl always, and tensorboard (run.dir/tb/), wandb (offline unless WANDB_MODE
    # says otherwise), mlflow (a file store unless MLFLOW_TRACKING_URI); these two in wandb/ and mlruns/ of the
    # outermost run dir (a pipeline's, for its stages); the step counts images trained on (README: Watching a run)
    log: list[str] = choice(["jsonl"], TRACKERS)


@dataclass
class AugmentConfig:
    """What the training views' augmentations do, the same on the torchvision and DALI backends
    (data.transforms.Augment, whose defaults these are: the recipe's)."""
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
    backend: str = choice("auto", "auto", "dali", "torch")   # image loading; auto: dali when nvidia.dali imports
    image_size: int = number(28, ">= 8")   # px; three stride-2 stages leave 1 px of an 8 px image
    workers: int = number(2, ">= 0")       # loader processes; 0 = load in the training process
    # an image that does not decode: stop naming it (error), or the next decodable image stands in (skip)
    on_bad_image: str = choice("error", "error", "skip")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class StageConfig:
    """The sections every stage config (and the pipeline's) starts with, so a resolved config.yaml
    always opens with run and data."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ModelConfig:
    backbone: str = choice("small", "small", "resnet18", "resnet50")
    small_stem: bool = False        # resnets: 3x3 stride-1 stem without max-pool, for small images
    width: int = number(32, ">= 1")   # small net: channels of its first stage


@dataclass
class TrainConfig:
    # passes over the training images (FixMatch: the unlabeled ones); train.steps, when set, wins
    epochs: int = number(10, ">= 1")
    # the stage's length in optimizer steps instead of train.epochs, which it overrides: the same work
    # whatever the number of images (end-of-epoch work still follows each pass); 0 = train.epochs
    steps: int = number(0, ">= 0")
    # with train.steps: the warm-up's length in steps (a warm-up in epochs would grow with the pile);
    # without it, lars.warmup_epochs / sgd.warmup_epochs set the warm-up
    warmup_steps: int = number(0, ">= 0")
    batch_size: int = number(256, ">= 1")   # global: each of N ranks takes batch_size / N
    # true: batch_size is the largest batch, lowered to what the dataset's images allow (a multiple of the
    # ranks; said in one line); false: a batch they cannot fill stops the run before any work
    fit_batch: bool = False
    max_steps: int = number(0, ">= 0")      # 0 = no cap; a cap for smoke runs and benchmarks
    # a time budget for the training loop: the steps that fit it, measured as it trains, at most those
    # train.steps or train.epochs (and train.max_steps) plan; the schedule ends when the time does. 0 = none
    minutes: float = number(0.0, ">= 0")
    # auto: bf16 on a GPU with native bf16 (fp16 where it is only emulated); on a CPU the faster of fp32 and bf16 for this model and batch, measured at start
    precision: str = choice("fp32", "fp32", "bf16", "fp16", "auto")
    # What a training stage does when a loss is not finite: stop with one line naming the step, or
    # skip that step's update (counted and logged), so that one bad batch (e.g. an fp16 overflow)
    # need not end a long run.
    on_nan: str = choice("stop", "stop", "skip")


@dataclass
class KnnConfig:
    """kNN top-1 of a backbone's embeddings: the labeled images vote for each image's class."""
    k: int = number(20, ">= 1")                  # at most the labeled images: checked by the stage
    temperature: float = number(0.07, "> 0")     # divides the similarities


@dataclass
class PretrainKnnConfig(KnnConfig):
    # epochs between kNN top-1 checks on val while pretraining (also at the start and the end); 0 = none
    every_epochs: int = number(1, ">= 0")


# ---- stage configs ----

@dataclass
class PretrainSection:
    # the self-supervised method (trainer/algorithms/self_supervised.py); barlow_twins: settings in section barlow
    method: str = choice("barlow_twins", SELF_SUPERVISED)


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
class PretrainConfig(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lars: LarsConfig = field(default_factory=LarsConfig)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    barlow: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    knn: PretrainKnnConfig = field(default_factory=PretrainKnnConfig)
    RETIRED = {"optim": "renamed lars (learning rates per 256 images of global batch)"}


@dataclass
class SgdConfig:
    # learning rates as given, whatever train.batch_size is (not scaled by batch size); 0 = frozen
    lr_backbone: float = number(0.05, ">= 0")
    lr_head: float = number(0.05, ">= 0")
    weight_decay: float = number(0.0, ">= 0")     # never applied to biases and norm parameters
    momentum: float = number(0.9, "[0, 1)")       # 1 would never forget a gradient
    nesterov: bool = False
    warmup_epochs: float = number(0, ">= 0")      # epochs of linear warmup, then a cosine down to 0


@dataclass
class FinetuneSection:
    # random: random init (the supervised baseline)
    backbone: str = path("backbone.pt, a model.pt whose backbone is reused, or random")
    labeled: str = "labeled"        # split name, or a CSV file (path,label) whose image paths are relative to data.root
    pseudo_labels: str = ""         # optional CSV (path,label[,score]) of pseudo-labels, added to labeled
    eval_every: int = number(1, ">= 1")   # epochs between val evaluations (model.pt keeps the best by val)
    # training view: "train" = random resized crop + flip (photos), "weak" = flip + small translation
    # (FixMatch's weak view: centred objects whose shape is the class, e.g. Fashion-MNIST)
    augment: str = choice("train", "train", "weak")
    RETIRED = {"init": "renamed finetune.backbone (a path, or random)"}


@dataclass
class FinetuneConfig(StageConfig):
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
    # P per iteration: a whole number of images per class each (or pseudo.schedule_fraction instead)
    schedule: list[int] = counts([200, 300, 400, 500], ">= 1", fractions="schedule_fraction")
    # P per iteration as fractions of the unlabeled images per class (rounded, at least 1 image), so that a
    # config carries over to a dataset of another size; [] = pseudo.schedule's numbers of images
    schedule_fraction: list[float] = fractions([], "(0, 1]", counts="schedule")
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
    # also write the (top_k, P) selection for FixMatch, P = this many images per class; 0 = no selection
    # (unless pseudo.fixmatch_fraction gives P)
    fixmatch_p: int = counts(16, ">= 0", fractions="fixmatch_fraction")
    # the FixMatch selection's P as a fraction of the unlabeled images per class instead (rounded, at least 1
    # image); 0 = pseudo.fixmatch_p's number of images
    fixmatch_fraction: float = fractions(0.0, "[0, 1]", counts="fixmatch_p")
    chunk: int = number(65536, ">= 1")         # rows per streamed chunk in selection
    # what ranks an image for a class: the model's softmax (classifier), label propagation over the kNN
    # graph of the model's embeddings from the labeled images (propagation, section propagation), or
    # the mean of the two distributions (mean)
    scorer: str = choice("classifier", "classifier", "propagation", "mean")
    # class-adaptive P: a class keeps P x (its selection's mean score / the most confident class's)
    class_adaptive: bool = False

    def __post_init__(self):
        """P per iteration comes from one key of the pair; the FixMatch selection's from at most one."""
        if bool(self.schedule) == bool(self.schedule_fraction):
            raise ConfigError(f"pseudo.schedule={self.schedule} and pseudo.schedule_fraction={self.schedule_fraction}: "
                              "expected P per iteration in one of them (numbers of images per class, or fractions "
                              "of the unlabeled images per class)")
        if self.fixmatch_p and self.fixmatch_fraction:
            raise ConfigError(f"pseudo.fixmatch_p={self.fixmatch_p} and pseudo.fixmatch_fraction="
                              f"{self.fixmatch_fraction}: expected at most one of them")


@dataclass
class PropagationConfig:
    k: int = number(20, ">= 1")                    # neighbours per image in the graph
    # how far labels spread: Z = (I - alpha W)^-1 Y; 0 would spread none beyond the labeled images
    alpha: float = number(0.99, "(0, 1)")
    iterations: int = number(20, ">= 1")           # conjugate-gradient steps
    gamma: float = number(3.0, "> 0")              # edge weight = similarity^gamma


@dataclass
class PseudolabelConfig(StageConfig):
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    pseudo: PseudoSection = field(default_factory=PseudoSection)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)


@dataclass
class FixmatchSection:
    model: str = path("the model.pt (backbone + head) FixMatch starts from")
    labeled: str = "labeled"        # split name or CSV
    pseudo_labels: str = ""         # CSV of pseudo-labels added to the labeled set (the K=10, P=16 selection)
    mu: int = number(7, ">= 1")                   # unlabeled batch = mu x labeled batch
    # the semi-supervised algorithm (trainer/algorithms/semi_supervised.py): FixMatch or a variant, which differ in
    # which images' pseudo-labels count and how much (trainer/algorithms/fixmatch.py has each formula)
    variant: str = choice("fixmatch", SEMI_SUPERVISED)
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
class FixmatchConfig(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)   # the network fixmatch.model=random builds
    train: TrainConfig = field(default_factory=TrainConfig)   # batch_size = labeled batch (global)
    sgd: SgdConfig = field(default_factory=lambda: SgdConfig(lr_backbone=0.01, lr_head=0.01,
                                                             weight_decay=5e-4, nesterov=True))
    fixmatch: FixmatchSection = field(default_factory=FixmatchSection)
    RETIRED = {"optim": "renamed sgd (learning rates as given, not scaled by batch size)"}


@dataclass
class EvaluateSection:
    """What is scored is what is given (at least one): a model.pt -> top-1/top-5 per scale and with
    TTA; a backbone.pt -> kNN top-1 of its embeddings (section knn)."""
    model: str = path("a model.pt", required=False)
    scales: list[int] = nonempty([28, 36], ">= 8")   # px, as data.image_size; TTA averages their probabilities
    tta: str = choice("all", "all", "val")   # TTA over all the scales, or over the subset best on val
    # also try each TTA candidate with its views' horizontal mirrors added (tta=all: always add them)
    mirror: bool = False
    splits: list[str] = nonempty(["val", "test"])
    backbone: str = path("a backbone.pt", required=False)
    RETIRED = {"knn": "kNN scores are computed when evaluate.backbone is given, TTA scores when evaluate.model is",
               "k": "moved to knn.k (the knn section, as in pretrain)",
               "temperature": "moved to knn.temperature (the knn section, as in pretrain)"}


@dataclass
class EvaluateConfig(StageConfig):
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    knn: KnnConfig = field(default_factory=KnnConfig)   # scores evaluate.backbone
    RETIRED = {"model": "the backbone's architecture is read from backbone.json next to evaluate.backbone; "
                        "drop the model section"}


@dataclass
class ActiveSection:
    model: str = path("the model.pt whose margins pick the queries")
    backbone: str = path("the backbone.pt whose embeddings are clustered")
    labeled: str = "labeled"        # the labels so far (split name or CSV): never queried, kept in labeled.csv
    # the budget is split evenly over them; a budget of fewer queries gets that many clusters (said in one line)
    clusters: int = number(200, ">= 1")
    # the budget: a whole number of queries (or active.budget_fraction instead; 0 = not set)
    budget: int = counts(0, ">= 1", fractions="budget_fraction", unit="queries", of="the labeled + unlabeled images")
    # the budget as a fraction of the labeled + unlabeled images (rounded), so that a config carries over to a
    # dataset of another size; 0 = active.budget's number of queries
    budget_fraction: float = fractions(0.0025, "(0, 1]", counts="budget")
    niter: int = number(20, ">= 1")         # k-means iterations
    # k-means trains on a sample of clusters x this many candidates (those faiss would draw), gathered on
    # rank 0; every rank then assigns its own candidates to the centroids; 0 = train on all of them
    max_points_per_centroid: int = number(256, ">= 0")
    oracle: bool = False            # answer from unlabeled.csv's hidden labels (simulations only)
    answers: str = ""               # an annotator's answers to import instead: a CSV (path,label) or Label Studio's JSON export

    def __post_init__(self):
        """The budget comes from one key of the pair."""
        if bool(self.budget) == bool(self.budget_fraction):
            raise ConfigError(f"active.budget={self.budget} and active.budget_fraction={self.budget_fraction}: "
                              "expected the budget in one of them (a number of queries, or a fraction of the "
                              "labeled + unlabeled images)")


@dataclass
class ActiveConfig(StageConfig):
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
class PredictConfig(StageConfig):
    # skip: unreadable images are listed in bad_images.txt; error: stop at the first chunk holding one
    data: DataConfig = field(default_factory=lambda: DataConfig(on_bad_image="skip"))
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    predict: PredictSection = field(default_factory=PredictSection)


@dataclass
class StageSpec:
    config: str = path("the stage's YAML config")
    overrides: list[str] = field(default_factory=list)   # key=value, applied after the pipeline's own


@dataclass
class BaselineSpec(StageSpec):
    """A baseline's stage config: set when pipeline.baselines names it."""
    config: str = path("the baseline's YAML config", required=False)


@dataclass
class PipelineSection:
    nproc: int = number(1, ">= 1")   # processes per stage: 1 runs inline, more under torchrun
    supervised: StageSpec = field(default_factory=StageSpec)
    pretrain: StageSpec = field(default_factory=StageSpec)
    finetune: StageSpec = field(default_factory=StageSpec)
    pseudolabel: StageSpec = field(default_factory=StageSpec)
    fixmatch: StageSpec = field(default_factory=StageSpec)
    active: StageSpec = field(default_factory=StageSpec)
    # the FixMatch after active learning: pipeline.fixmatch's config and overrides, then these
    fixmatch_active_overrides: list[str] = field(default_factory=list)
    evaluate: StageSpec = field(default_factory=StageSpec)
    predict: StageSpec = field(default_factory=StageSpec)   # labels the unlabeled pile with the final model
    # false: no active learning (stages active, fixmatch_active and its evaluation); FixMatch's model is final
    active_learning: bool = True
    # who answers active learning's queries: true = unlabeled.csv's hidden labels (simulations: the demo);
    # false = you: the pipeline stops once run.dir/active/queries.csv is written, and continues when rerun
    # with `answers`
    oracle: bool = True
    # your labels for run.dir/active/queries.csv: a CSV path,label (label: a class name or id), or Label
    # Studio's JSON export (active.py export --format label-studio)
    answers: str = ""
    # Other ways to a model, run after the recipe and scored against its final model at equal minutes (the
    # report's difference line): each trains the recipe's network on the run's labeled split, for the wall
    # minutes of the steps that make the final model (not the supervised reference, the other evaluations or
    # predict), then is evaluated with pipeline.evaluate. Each name has its pipeline.<name> spec below
    # (trainer/runtime/stages.py BASELINES).
    baselines: list[str] = field(default_factory=list)
    # baseline fixmatch_only: FixMatch from random init on the labeled images alone (no pseudo-labels, no
    # active learning answers)
    fixmatch_only: BaselineSpec = field(default_factory=BaselineSpec)

    @property
    def fixmatch_active(self) -> StageSpec:
        """The FixMatch after active learning: pipeline.fixmatch, then fixmatch_active_overrides."""
        return StageSpec(self.fixmatch.config, [*self.fixmatch.overrides, *self.fixmatch_active_overrides])


@dataclass
class PipelineConfig(StageConfig):
    pipeline: PipelineSection = field(default_factory=PipelineSection)

