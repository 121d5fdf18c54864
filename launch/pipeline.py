"""The whole recipe as one resumable run: supervised baseline, Barlow Twins, fine-tune, balanced
pseudo-labels, FixMatch, active learning + FixMatch, evaluation with multi-scale TTA, the final model's
labels for the unlabeled pile (run.dir/predict/predictions.csv, with the TTA views evaluate chose), report.

    python launch/pipeline.py --config configs/demo/pipeline.yaml [--force STAGE ...] [key=value ...]

Each stage runs its own launch script in run.dir/<stage>; a stage whose output exists is skipped,
and a stage that was killed resumes from its checkpoint, so rerunning the command continues.

Active learning's queries are answered by unlabeled.csv's hidden labels with pipeline.oracle=true (the
demo's simulation). With pipeline.oracle=false (your own images) the run stops once
run.dir/active/queries.csv is written, with one line saying what to label and the command that goes on:
the same one with pipeline.answers=ANSWERS.csv (path,label), which imports them and runs the rest.
pipeline.active_learning=false leaves active learning out: FixMatch's model is then the final one.
"""
import argparse
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import time

from trainer.runtime import config, engine, rundir
from trainer.operations import pipeline_answers, report
from trainer.runtime.config import STAGE_CONFIGS, AugmentConfig, PipelineConfig, PipelineSection

# the stages that produce a classifier, in recipe order: each is scored by evaluate_<stage>
MODEL_STAGES = ["supervised", "finetune", "pseudolabel", "fixmatch", "fixmatch_active"]
# the stages that pipeline.active_learning=false leaves out
ACTIVE_LEARNING = ("active", "fixmatch_active", "evaluate_fixmatch_active")


def final_model(p: PipelineSection) -> str:
    """The stage whose model is the pipeline's result: FixMatch after active learning, or FixMatch without it."""
    return "fixmatch_active" if p.active_learning else "fixmatch"


# (stage, script, which pipeline.<spec> configures it, the file that marks it finished,
#  how it is wired to the stages before it: (dir(stage), pipeline section) -> overrides)
STAGES = [
    ("supervised", "finetune", "supervised", "model.pt", lambda d, p: []),
    ("pretrain", "pretrain", "pretrain", "backbone.pt", lambda d, p: []),
    ("finetune", "finetune", "finetune", "model.pt",
     lambda d, p: [f"finetune.backbone={d('pretrain')}/backbone.pt"]),
    ("pseudolabel", "pseudolabel", "pseudolabel", "selection.json",
     lambda d, p: [f"pseudo.model={d('finetune')}/model.pt", f"pseudo.backbone={d('pretrain')}/backbone.pt"]),
    ("fixmatch", "fixmatch", "fixmatch", "model.pt",
     lambda d, p: [f"fixmatch.model={d('pseudolabel')}/model.pt",
                   f"fixmatch.pseudo_labels={d('pseudolabel')}/pseudo_labels.csv"]),
    # labeled.csv is written once the queries are answered: without an oracle or answers, the stage writes
    # queries.csv and the pipeline stops after it
    ("active", "active", "active", "labeled.csv",
     lambda d, p: [f"active.model={d('fixmatch')}/model.pt", f"active.backbone={d('pretrain')}/backbone.pt",
                   *pipeline_answers.answers_from(p)]),
    ("fixmatch_active", "fixmatch", "fixmatch_active", "model.pt",
     lambda d, p: [f"fixmatch.model={d('fixmatch')}/model.pt", f"fixmatch.labeled={d('active')}/labeled.csv",
                   f"fixmatch.pseudo_labels={d('pseudolabel')}/pseudo_labels.csv"]),
    ("evaluate_knn", "evaluate", "evaluate", "eval.json",
     lambda d, p: ["evaluate.model=", f"evaluate.backbone={d('pretrain')}/backbone.pt"]),
] + [
    (f"evaluate_{model}", "evaluate", "evaluate", "eval.json",
     lambda d, p, model=model: [f"evaluate.model={d(model)}/model.pt", "evaluate.backbone="])
    for model in MODEL_STAGES
] + [
    # the final model labels predict.input (the demo and paper configs: the unlabeled pile) with the TTA
    # scales and mirrors its evaluation chose on val; summary.json is written after predictions.csv
    ("predict", "predict", "predict", "summary.json",
     lambda d, p: [f"predict.model={d(final_model(p))}/model.pt",
                   f"predict.tta_from={d('evaluate_' + final_model(p))}"]),
]


def stages_of(p: PipelineSection) -> list[tuple]:
    """STAGES, less those of active learning when pipeline.active_learning=false."""
    return [s for s in STAGES if p.active_learning or s[0] not in ACTIVE_LEARNING]


def run_stage(script: str, argv: list[str], nproc: int):
    if nproc == 1:   # inline: a killed pipeline leaves no orphan behind
        importlib.import_module(f"launch.{script}").main(argv)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           importlib.import_module(f"launch.{script}").__file__, *argv]
    if subprocess.run(cmd).returncode != 0:
        raise engine.StageError(f"stage {script} failed under torchrun (command: {' '.join(cmd)})")


def check_stages(todo: list[tuple[str, str, list[str]]]):
    """Every stage that will run has a valid config and passes its data checks (a stage script's
    `check(cfg)`), before anything is deleted or run: a typo must not cost a finished stage."""
    for name, script, argv in todo:
        try:
            stage_cfg = engine.parse(STAGE_CONFIGS[script], argv, name)
            check = getattr(importlib.import_module(f"launch.{script}"), "check", None)
            if check:
                check(stage_cfg)
        except (config.ConfigError, ValueError) as e:
            raise config.ConfigError(f"stage {name}: {e}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the whole semiscale recipe")
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="rerun STAGE and everything after it (repeatable; 'all' for everything)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = config.load(PipelineConfig, args.config, args.overrides)
    stages = stages_of(cfg.pipeline)
    names = [s[0] for s in stages]
    unknown = [f for f in args.force if f not in names + ["all"]]
    if unknown:
        off = " (pipeline.active_learning=false leaves it out)" if unknown[0] in ACTIVE_LEARNING else ""
        raise config.ConfigError(f"--force {unknown[0]}: expected 'all' or one of {', '.join(names)}{off}")

    def stage_dir(name):
        return os.path.join(cfg.run.dir, name)

    # the pipeline's data.augment keys that differ from the defaults apply to every stage (its own
    # overrides still come last); the others leave each stage config's own
    augment = [f"data.augment.{key}={value}" for key, value in dataclasses.asdict(cfg.data.augment).items()
               if value != getattr(AugmentConfig(), key)]

    def stage_argv(spec_name, wiring, name):
        spec = getattr(cfg.pipeline, spec_name)
        return ["--config", spec.config, f"run.dir={stage_dir(name)}", f"data.root={cfg.data.root}",
                f"data.backend={cfg.data.backend}", f"run.device={cfg.run.device}", f"run.seed={cfg.run.seed}",
                *augment, *wiring(stage_dir, cfg.pipeline), *spec.overrides]

    forced = len(names) if not args.force else min(
        0 if "all" in args.force else names.index(f) for f in args.force)
    todo = [(name, script, stage_argv(spec_name, wiring, name)) for i, (name, script, spec_name, output, wiring)
            in enumerate(stages) if i >= forced or not os.path.exists(os.path.join(stage_dir(name), output))]
    active_argv = next((argv for name, _, argv in todo if name == "active"), None)
    pipeline_answers.check_answers(cfg, stage_dir("active"), active_argv,
                                   "active" in names and names.index("active") >= forced)
    check_stages(todo)
    lock = rundir.claim_pipeline(cfg.run.dir)   # every check has passed: the first write
    if not os.path.exists(os.path.join(cfg.run.dir, rundir.RUN_RECORD)):
        engine.write_json(os.path.join(cfg.run.dir, rundir.RUN_RECORD), {"stage": "pipeline"})
    engine.write_text(os.path.join(cfg.run.dir, rundir.CONFIG), config.dumps(cfg))
    times_path = os.path.join(cfg.run.dir, "stage_times.json")
    times = engine.read_json(times_path) if os.path.exists(times_path) else {}
    for i, (name, script, spec_name, output, wiring) in enumerate(stages):
        folder = stage_dir(name)
        if i >= forced and os.path.exists(folder):
            shutil.rmtree(folder)
        if os.path.exists(os.path.join(folder, output)):
            print(f"[pipeline] {name}: done, skipped ({folder}/{output} exists)", flush=True)
            continue
        argv = stage_argv(spec_name, wiring, name)
        if (name == "active" and not cfg.pipeline.oracle and not cfg.pipeline.answers
                and pipeline_answers.queries_waiting(folder, argv)):
            print(f"[pipeline] {name}: queries written before, not answered yet ({folder}/queries.csv)", flush=True)
        else:
            print(f"[pipeline] {name}: {script}.py {' '.join(argv)}", flush=True)
            t0 = time.time()
            run_stage(script, argv, cfg.pipeline.nproc)
            times[name] = times.get(name, 0.0) + time.time() - t0
            engine.write_json(times_path, times)
        if name == "active" and not os.path.exists(os.path.join(folder, output)):   # the queries wait for you
            lock.release()
            print(pipeline_answers.pause_line(os.path.abspath(__file__), args, cfg, folder), flush=True)
            return
    report.write(cfg.run.dir, times, [s for s in MODEL_STAGES if s in names])
    lock.release()
    print(f"[pipeline] labels: {os.path.join(stage_dir('predict'), 'predictions.csv')} (model: "
          f"{os.path.join(stage_dir(final_model(cfg.pipeline)), 'model.pt')})", flush=True)
    print(f"[pipeline] report: {os.path.join(cfg.run.dir, 'report.md')}", flush=True)


if __name__ == "__main__":
    engine.cli(main)
