"""The stage contract: every stage semiscale runs, declared once, and the pipeline's recipe built from them.

A `Stage` is a script in launch/ with a config: its name, config class, the file that marks a run of it
finished, and how it runs (`main(argv)` of launch/<name>.py) and what it checks before any write
(`check(cfg)` there, where it has one). The pipeline, pseudo-labels' inner fine-tunes, launch/submit.py,
the GPU smoke and the tests read STAGES; nothing else lists stages.

A `Step` is one run of a stage inside the pipeline (`RECIPE`): which stage, which pipeline.<spec>
configures it, and its inputs, wired from earlier steps' outputs. `BASELINES` are steps the pipeline adds
after the recipe when pipeline.baselines names them: other ways to a model, given the recipe's labels and
minutes and scored against its final model.

Settings that a run passes down to the runs it starts (the pipeline to its stages, pseudolabel to its
fine-tunes) go through `shared_overrides`, the one place that forwards them.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

from data.errors import InputError
from trainer import dist
from trainer.runtime import engine, tracking
from trainer.runtime.config import (ActiveConfig, ConfigError, EvaluateConfig, FinetuneConfig, FixmatchConfig,
                                    PipelineConfig,
                                    PredictConfig, PretrainConfig, PseudolabelConfig)


@dataclass(frozen=True)
class Stage:
    name: str           # launch/<name>.py
    config: type        # its config class
    done: str           # the file in run.dir that marks a finished run
    description: str

    @property
    def module(self):
        return importlib.import_module(f"launch.{self.name}")

    def run(self, argv: list[str], nproc: int = 1):
        """In this process (nproc=1: a killed caller leaves no orphan behind), or under torchrun with nproc ranks."""
        if nproc == 1:
            self.module.main(argv)
            return
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               self.module.__file__, *argv]
        if subprocess.run(cmd).returncode != 0:
            raise engine.StageError(f"stage {self.name} failed under torchrun (command: {' '.join(cmd)})")

    def parse(self, argv: list[str]):
        """The resolved config this stage would run with (`--config FILE key=value ...`)."""
        return engine.parse(self.config, argv, self.description)

    def start(self, argv: list[str]):
        """A training or inference run's opening: its config, the checks before any work, the process group,
        the dataset's splits against each other and the seed. (config, runtime)."""
        cfg = self.parse(argv)
        self.check(cfg)
        rt = dist.init(cfg.run.device)
        # the labels it trains on: its section's `labeled` (a split name or a CSV) where it has one
        engine.check_dataset(cfg, rt, getattr(getattr(cfg, self.name, None), "labeled", "labeled"))
        engine.seed_everything(cfg.run.seed)
        return cfg, rt

    def check(self, cfg):
        """Every check the stage can make before its inputs exist (the stage calls it too)."""
        tracking.check(cfg.run.log)   # the run checks it again when it claims its dir: this is for the pipeline
        check = getattr(self.module, "check", None)
        if check:
            check(cfg)


STAGES = {s.name: s for s in [
    Stage("pretrain", PretrainConfig, "backbone.pt", "Self-supervised pretraining (pretrain.method: Barlow Twins by default)"),
    Stage("finetune", FinetuneConfig, "model.pt", "Fine-tune backbone + linear head"),
    Stage("pseudolabel", PseudolabelConfig, "selection.json", "Balanced pseudo-label iterations"),
    Stage("fixmatch", FixmatchConfig, "model.pt", "FixMatch with an EMA of the weights"),
    # labeled.csv is written once the queries are answered: queries.csv alone is a run waiting for answers
    Stage("active", ActiveConfig, "labeled.csv", "Active learning: margin queries per cluster, then their answers"),
    Stage("evaluate", EvaluateConfig, "eval.json", "Top-1/top-5 per scale and with multi-scale TTA, and/or kNN top-1"),
    Stage("predict", PredictConfig, "summary.json", "A classifier's class, confidence and top-k for every image of a "
                                                  "split, a CSV or a folder, written to run.dir/predictions.csv"),
    Stage("pipeline", PipelineConfig, "report.md", "Run the whole semiscale recipe"),
]}


# ---- settings a run passes down ----

# Forwarded always: where the data is, how it is read, on what, with which seed.
ALWAYS = ("run.seed", "run.device", "data.root", "data.backend")
# Forwarded where the parent's value differs from the default: a child config's own setting otherwise stays
# (the demo's FixMatch config sets its own strong view).
WHERE_SET = ("data.augment", "train.precision", "run.log")


def _declared(cfg_or_cls, dotted: str):
    """The value (or default) at `dotted` in a config or config class; a missing key -> KeyError."""
    node = cfg_or_cls() if isinstance(cfg_or_cls, type) else cfg_or_cls
    for key in dotted.split("."):
        if not dataclasses.is_dataclass(node) or key not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(dotted)
        node = getattr(node, key)
    return node


def declares(cfg_class: type, dotted: str) -> bool:
    """Whether the config class `cfg_class` has the key `dotted` (e.g. train.max_steps)."""
    try:
        _declared(cfg_class, dotted)
    except KeyError:
        return False
    return True


def _leaves(node, prefix: str):
    if not dataclasses.is_dataclass(node):
        yield prefix, node
        return
    for f in dataclasses.fields(node):
        yield from _leaves(getattr(node, f.name), f"{prefix}.{f.name}")


def override_text(value) -> str:
    """`value` as the text of a key=value override that reads back as the same value."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("\n...\n").strip()


def shared_overrides(parent, child: type) -> list[str]:
    """`key=value` overrides that carry the shared settings of the running config `parent` into a run of the
    config class `child`: ALWAYS keys, and WHERE_SET keys whose value is not the default; only keys both
    declare."""
    defaults, out = type(parent)(), []
    for group in ALWAYS + WHERE_SET:
        try:
            value, default = _declared(parent, group), _declared(defaults, group)
            _declared(child, group)
        except KeyError:
            continue
        for (key, v), (_, d) in zip(_leaves(value, group), _leaves(default, group)):
            if group in ALWAYS or v != d:
                out.append(f"{key}={override_text(v)}")
    return out


# ---- the pipeline's recipe ----

@dataclass(frozen=True)
class Step:
    name: str                       # run.dir/<name>
    stage: str                      # a key of STAGES
    spec: str                       # pipeline.<spec> names its config and overrides
    # config key -> "<step>/<file>" of an earlier step ("{final}": the pipeline's final model step), or "" to clear
    inputs: dict = field(default_factory=dict)
    row: str = ""                   # the report's row for a step whose model is scored (evaluate_<name>)
    active_learning: bool = False   # left out with pipeline.active_learning=false
    settings: tuple = ()            # key=value overrides that make the step what it is (before its spec's own)

    @property
    def done(self) -> str:
        return STAGES[self.stage].done


def _evaluation(model_step: str, active_learning: bool = False) -> Step:
    return Step(f"evaluate_{model_step}", "evaluate", "evaluate",
                {"evaluate.model": f"{model_step}/model.pt", "evaluate.backbone": ""}, active_learning=active_learning)


# ({labels}: the labeled images the run started with; {queries}: the answers active learning added)
_MODEL_STEPS = [
    Step("supervised", "finetune", "supervised", row="Supervised only ({labels} labels, random init)"),
    Step("pretrain", "pretrain", "pretrain"),
    Step("finetune", "finetune", "finetune", {"finetune.backbone": "pretrain/backbone.pt"},
         row="+ fine-tune (backbone + linear head)"),
    Step("pseudolabel", "pseudolabel", "pseudolabel",
         {"pseudo.model": "finetune/model.pt", "pseudo.backbone": "pretrain/backbone.pt"},
         row="+ balanced pseudo-label iterations"),
    Step("fixmatch", "fixmatch", "fixmatch",
         {"fixmatch.model": "pseudolabel/model.pt", "fixmatch.pseudo_labels": "pseudolabel/pseudo_labels.csv"},
         row="+ FixMatch"),
    # who answers the queries (active.oracle / active.answers) is the pipeline's: pipeline_answers.answers_from
    Step("active", "active", "active", {"active.model": "fixmatch/model.pt", "active.backbone": "pretrain/backbone.pt"},
         active_learning=True),
    Step("fixmatch_active", "fixmatch", "fixmatch_active",
         {"fixmatch.model": "fixmatch/model.pt", "fixmatch.labeled": "active/labeled.csv",
          "fixmatch.pseudo_labels": "pseudolabel/pseudo_labels.csv"},
         row="+ active learning ({queries} answers), FixMatch again", active_learning=True),
]
RECIPE = [
    *_MODEL_STEPS,
    Step("evaluate_knn", "evaluate", "evaluate", {"evaluate.model": "", "evaluate.backbone": "pretrain/backbone.pt"}),
    *(_evaluation(s.name, s.active_learning) for s in _MODEL_STEPS if s.row),
    # the final model labels predict.input (the demo and paper configs: the unlabeled pile) with the TTA
    # scales and mirrors its evaluation chose on val
    Step("predict", "predict", "predict", {"predict.model": "{final}/model.pt", "predict.tta_from": "evaluate_{final}"}),
]


def check_steps(todo: list[tuple[Step, list[str]]]):
    """Every step that will run (with its argv) has a valid config and passes its stage's checks, before
    anything is deleted or run: a typo must not cost a finished stage."""
    for step, argv in todo:
        stage = STAGES[step.stage]
        try:
            stage.check(stage.parse(argv))
        except InputError as e:
            raise ConfigError(f"stage {step.name}: {e}") from None


def recipe(active_learning: bool) -> list[Step]:
    """The pipeline's steps in order, less those of active learning when it is off."""
    return [s for s in RECIPE if active_learning or not s.active_learning]


def final_step(active_learning: bool) -> str:
    """The step whose model is the pipeline's result: FixMatch after active learning, or FixMatch without it."""
    return "fixmatch_active" if active_learning else "fixmatch"


def wired_inputs(step: Step, run_dir: str, active_learning: bool) -> list[str]:
    """`key=path` overrides that point a step's inputs at the earlier steps' folders in run_dir."""
    final = final_step(active_learning)
    return [f"{key}={os.path.join(run_dir, source.format(final=final)) if source else ''}"
            for key, source in step.inputs.items()]


def _sources(step: Step, final: str) -> set[str]:
    """The earlier steps whose files `step` reads."""
    return {source.format(final=final).split("/")[0] for source in step.inputs.values() if source}


def readers(name: str, active_learning: bool) -> list[str]:
    """The steps that read step `name`'s files, directly or through another reader's, in recipe order: what is
    stale once those files change."""
    final, stale = final_step(active_learning), {name}
    for step in recipe(active_learning):   # a step's inputs come before it in the recipe
        if _sources(step, final) & stale:
            stale.add(step.name)
    return [s.name for s in recipe(active_learning) if s.name in stale - {name}]


def final_model_steps(active_learning: bool) -> list[str]:
    """The steps that make the final model, in recipe order: the final step and those whose files it reads,
    directly or through another's; not the supervised reference, the evaluations or predict."""
    final = final_step(active_learning)
    made_by = {final}
    for step in reversed(recipe(active_learning)):   # a step's inputs come before it in the recipe
        if step.name in made_by:
            made_by |= _sources(step, final)
    return [s.name for s in recipe(active_learning) if s.name in made_by]


def recipe_timed_steps(active_learning: bool) -> list[str]:
    """The steps whose wall seconds are the recipe's minutes, the budget of a baseline: those that make the final
    model, then its evaluation (it chooses the TTA views on val)."""
    return [*final_model_steps(active_learning), f"evaluate_{final_step(active_learning)}"]


# ---- baselines: other ways to a model, run after the recipe on its labels and minutes (pipeline.baselines) ----

# The network a baseline trains: the recipe's fine-tune's model section, which every later model keeps.
RECIPE_NETWORK = "finetune"
# Each a model step, configured by pipeline.<name>, then its evaluation with pipeline.evaluate (as the recipe's
# final model). Its row starts with its short name (the report's difference line uses it); {minutes}: the wall
# minutes it and its evaluation took. The pipeline adds `settings`, the recipe's network (model.*) and
# train.minutes: the recipe's minutes less its final evaluation's, which the baseline's own evaluation repeats.
BASELINES = {s.name: s for s in [
    Step("fixmatch_only", "fixmatch", "fixmatch_only", row="FixMatch only (random init, same labels, {minutes} min)",
         settings=("fixmatch.model=random", "fixmatch.labeled=labeled", "fixmatch.pseudo_labels=")),
]}


def baseline_steps(pipeline) -> list[Step]:
    """The steps of `pipeline.baselines` (a config.PipelineSection), each followed by its evaluation; a name not
    in BASELINES, or one whose pipeline.<name>.config is not set, stops the run with one line."""
    steps = []
    for name in dict.fromkeys(pipeline.baselines):   # a name given twice runs once
        if name not in BASELINES:
            raise ConfigError(f"pipeline.baselines: {name!r} is not one of {', '.join(BASELINES)}")
        if not getattr(pipeline, BASELINES[name].spec).config:
            raise ConfigError(f"pipeline.{BASELINES[name].spec}.config: required with pipeline.baselines naming "
                              f"{name} (configs/demo/{name}.yaml is the demo's)")
        steps += [BASELINES[name], _evaluation(name)]
    return steps


def network_overrides(model_cfg) -> list[str]:
    """`model.*=value` overrides that build the network of a config's model section (config.ModelConfig)."""
    return [f"{key}={override_text(value)}" for key, value in _leaves(model_cfg, "model")]
