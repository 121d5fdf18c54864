"""The whole recipe as one resumable run: supervised baseline, Barlow Twins, fine-tune, balanced
pseudo-labels, FixMatch, active learning + FixMatch, evaluation with multi-scale TTA, the final model's
labels for the unlabeled pile (run.dir/predict/predictions.csv, with the TTA views evaluate chose), report.

    python launch/pipeline.py --config configs/demo/pipeline.yaml [--force STAGE ...] [key=value ...]

Each stage runs its own launch script in run.dir/<stage>; a stage whose output exists is skipped,
and a stage that was killed resumes from its checkpoint, so rerunning the command continues.

Active learning's queries are answered by unlabeled.csv's hidden labels with pipeline.oracle=true (the
demo's simulation). With pipeline.oracle=false (your own images) the run stops once
run.dir/active/queries.csv is written, with one line saying what to label (first: in a browser, with
`active.py serve`'s annotation page) and the command that goes on: the same one with
pipeline.answers=ANSWERS.csv (path,label), which imports them and runs the rest. Every
row of ANSWERS.csv is checked before any stage runs; answers corrected after the run finished are imported
again and the steps that read them (FixMatch after active learning, its evaluation, predict) rerun.
pipeline.active_learning=false leaves active learning out: FixMatch's model is then the final one.

pipeline.baselines=[fixmatch_only] adds, after the recipe, FixMatch from random init on the labeled split
alone, trained for the wall minutes the recipe's final model took (run.dir/stage_times.json: the steps that
make it, and its evaluation), then evaluated as that model is; the report scores the two against each other.
A baseline made with another config than it would get now (its own settings, or the recipe's minutes after
a recipe step ran again) runs again, with its evaluation.
"""
import os
import shutil
import time

from trainer.operations import pipeline_answers, report
from trainer.runtime import config, engine, rundir, stages
from trainer.runtime.config import PipelineConfig
from trainer.runtime.stages import STAGES


def main(argv=None):
    parser = engine.ConfigParser(PipelineConfig, STAGES["pipeline"].description)
    parser.add_argument("--config", required=True)
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="rerun STAGE and everything after it (repeatable; 'all' for everything)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = config.load(PipelineConfig, args.config, args.overrides)
    p = cfg.pipeline
    baselines = stages.baseline_steps(p)
    steps = stages.recipe(p.active_learning) + baselines
    names = [s.name for s in steps]
    unknown = [f for f in args.force if f not in names + ["all"]]
    if unknown:
        off = " (pipeline.active_learning=false leaves it out)" if unknown[0] in [s.name for s in stages.RECIPE] else ""
        raise config.ConfigError(f"--force {unknown[0]}: expected 'all' or one of {', '.join(names)}{off}")
    rundir.check_owner(cfg.run.dir, "pipeline")   # a folder of the user's, before the stage dirs in it

    def stage_dir(name):
        return os.path.join(cfg.run.dir, name)

    # each step's wall seconds, kept across runs of the pipeline: a skipped step keeps those of the run that made it
    times_path = os.path.join(cfg.run.dir, "stage_times.json")
    times = engine.read_json(times_path) if os.path.exists(times_path) else {}

    def step_argv(step):
        spec = getattr(p, step.spec)
        answers = pipeline_answers.answers_from(p) if step.stage == "active" else []
        return ["--config", spec.config, f"run.dir={stage_dir(step.name)}",
                *stages.shared_overrides(cfg, STAGES[step.stage].config),
                *stages.wired_inputs(step, cfg.run.dir, p.active_learning), *answers, *step.settings,
                *(baseline_overrides() if step.name in stages.BASELINES else []), *spec.overrides]

    def baseline_overrides():
        """The recipe's network, and its minutes less its final evaluation's (the baseline's own evaluation
        repeats it) as train.minutes: once the recipe's steps have run, all of them."""
        network = STAGES[stages.RECIPE_NETWORK].parse(step_argv(steps[names.index(stages.RECIPE_NETWORK)])).model
        seconds = sum(times.get(name, 0.0) for name in stages.final_model_steps(p.active_learning))
        return [*stages.network_overrides(network), f"train.minutes={round(seconds / 60, 4)}"]

    forced = len(names) if not args.force else min(
        0 if "all" in args.force else names.index(f) for f in args.force)
    changed = pipeline_answers.check_answers(cfg, stage_dir("active"),
                                             step_argv(steps[names.index("active")]) if "active" in names else None,
                                             "active" in names and names.index("active") >= forced)
    # answers other than those imported: active imports them again (its queries stay), what read them reruns
    again = ["active", *stages.readers("active", p.active_learning)] if changed else []
    # baselines too: whether they run again is known once the recipe's minutes are
    todo = [(step, step_argv(step)) for i, step in enumerate(steps)
            if i >= forced or step.name in again or step in baselines
            or not os.path.exists(os.path.join(stage_dir(step.name), step.done))]
    if baselines:   # their minutes are the recipe's: a step kept from a run that recorded none has none
        running = {step.name for step, _ in todo}
        unrecorded = [name for name in stages.recipe_timed_steps(p.active_learning)
                      if name not in times and name not in running]
        if unrecorded:
            raise config.ConfigError(f"pipeline.baselines: {times_path} records no wall seconds for "
                                     f"{', '.join(unrecorded)}, whose minutes the baselines get; rerun from there "
                                     f"with --force {unrecorded[0]}")
    stages.check_steps(todo)
    lock = rundir.claim_pipeline(cfg.run.dir)   # every check has passed: the first write
    if not os.path.exists(os.path.join(cfg.run.dir, rundir.RUN_RECORD)):
        engine.write_json(os.path.join(cfg.run.dir, rundir.RUN_RECORD), {"stage": "pipeline"})
    engine.write_text(os.path.join(cfg.run.dir, rundir.CONFIG), config.dumps(cfg))

    def remove(name):
        """A step's folder and its recorded seconds: the run that redoes it records its own."""
        if os.path.exists(stage_dir(name)):
            shutil.rmtree(stage_dir(name))
        if times.pop(name, None) is not None:
            engine.write_json(times_path, times)

    if again:
        print(f"[pipeline] active: {p.answers} changes {changed} of the answers in {stage_dir('active')}/labeled.csv: "
              f"importing them again, then rerunning {', '.join(again[1:])}", flush=True)
        for name in again[1:]:   # before the import: a run killed in between finds them missing, not stale
            remove(name)
    for i, step in enumerate(steps):
        folder = stage_dir(step.name)
        if i >= forced:
            remove(step.name)
        argv = step_argv(step)
        if step.name in stages.BASELINES:
            stage = STAGES[step.stage]
            changes = rundir.changed_config(folder, config.to_dict(stage.parse(argv)), config.to_dict(stage.config()))
            if changes:   # its own settings, or the recipe's minutes once a recipe step ran again
                print(f"[pipeline] {step.name}: made with another config ({'; '.join(changes)}): running it and "
                      "its evaluation again", flush=True)
                remove(step.name)
                remove(f"evaluate_{step.name}")
        if os.path.exists(os.path.join(folder, step.done)) and step.name not in again:
            print(f"[pipeline] {step.name}: done, skipped ({folder}/{step.done} exists)", flush=True)
            continue
        if (step.name == "active" and not p.oracle and not p.answers
                and pipeline_answers.queries_waiting(folder, argv)):
            print(f"[pipeline] {step.name}: queries written before, not answered yet ({folder}/queries.csv)", flush=True)
        else:
            print(f"[pipeline] {step.name}: {step.stage}.py {' '.join(argv)}", flush=True)
            t0 = time.time()
            STAGES[step.stage].run(argv, p.nproc)
            times[step.name] = times.get(step.name, 0.0) + time.time() - t0
            engine.write_json(times_path, times)
        if step.name == "active" and not os.path.exists(os.path.join(folder, step.done)):   # the queries wait for you
            lock.release()
            print(pipeline_answers.pause_line(os.path.abspath(__file__), args, cfg, folder), flush=True)
            return
    report.write(cfg.run.dir, times, steps, stages.recipe_timed_steps(p.active_learning))
    lock.release()
    final = stages.final_step(p.active_learning)
    print(f"[pipeline] labels: {os.path.join(stage_dir('predict'), 'predictions.csv')} (model: "
          f"{os.path.join(stage_dir(final), 'model.pt')})", flush=True)
    print(f"[pipeline] report: {os.path.join(cfg.run.dir, 'report.md')}", flush=True)


if __name__ == "__main__":
    engine.cli(main)
