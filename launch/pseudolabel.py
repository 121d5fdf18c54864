"""Balanced pseudo-label iterations: predict -> top-P per class -> fine-tune on pseudo + labeled,
then on labeled only (head re-initialised); P grows each iteration; the best model by val wins. P is a
number of images per class (pseudo.schedule, pseudo.fixmatch_p) or a fraction of the unlabeled images per
class (pseudo.schedule_fraction, pseudo.fixmatch_fraction: balanced_selection.ConfiguredP), so that one
config suits any dataset size.
With pseudo.reinitialise=true each iteration's first fine-tune starts from the pretrained pseudo.backbone
instead of the model before it.

    python launch/pseudolabel.py --config configs/demo/pseudolabel.yaml [key=value ...]

Every model, pseudo.model and each iteration's, is scored by this stage's one val pass (inference.batch_size,
inference.precision); an iteration replaces pseudo.model only by beating it (trainer/runtime/keep.py).

Writes in run.dir: iter<i>/ (predictions, pseudo_labels.csv, selection.json, the two fine-tune runs),
kept.json (pseudo.model against the best iteration), model.pt (the best by val), predictions/ of that
model, pseudo_labels.csv (its top_k x P selection of pseudo.fixmatch_p or pseudo.fixmatch_fraction, for
FixMatch) and selection.json (every iteration's figures; p is the P used, p_given the configured value it
was resolved from).
"""
import os

from data.datasets import read_classes, read_split
from data.errors import InputError
from data.labels import landed_outside
from trainer import dist
from trainer.algorithms import balanced_selection
from trainer.operations import pseudo_labeling
from trainer.runtime import config, engine, keep, stages
from trainer.runtime.config import FinetuneConfig
from trainer.runtime.models import load_classifier, save_classifier


def finetune_argv(cfg, run_dir, init, epochs, pseudo_labels="") -> list[str]:
    """One of an iteration's two fine-tunes: the stage's own config and code, with this run's shared settings."""
    return ["--config", cfg.pseudo.finetune_config, f"run.dir={run_dir}", *stages.shared_overrides(cfg, FinetuneConfig),
            f"finetune.backbone={init}", f"finetune.pseudo_labels={pseudo_labels}", f"train.epochs={epochs}",
            *cfg.pseudo.finetune_overrides]


def finetune(cfg, run_dir, init, epochs, pseudo_labels=""):
    """A finished fine-tune (model.pt present) is kept."""
    if not os.path.exists(os.path.join(run_dir, "model.pt")):
        stages.STAGES["finetune"].run(finetune_argv(cfg, run_dir, init, epochs, pseudo_labels))


def check(cfg):
    """What can be checked before the inputs exist (the pipeline runs it before every stage)."""
    if cfg.pseudo.reinitialise and not cfg.pseudo.backbone:
        raise config.ConfigError("pseudo.backbone: required with pseudo.reinitialise=true: "
                                 "the pretrained backbone.pt each iteration starts from")
    images = len(read_split(cfg.data.root, "unlabeled")) + len(read_split(cfg.data.root, "labeled"))
    if cfg.pseudo.scorer != "classifier" and cfg.propagation.k >= images:
        raise config.ConfigError(f"propagation.k={cfg.propagation.k}: expected fewer than the {images} labeled + "
                                 "unlabeled images")
    # the iterations' fine-tune recipe, with this run's shared settings, is checked now, not after the first predictions
    nested = stages.STAGES["finetune"]
    try:
        nested.check(nested.parse(finetune_argv(cfg, cfg.run.dir, cfg.pseudo.model, cfg.pseudo.pseudo_epochs)))
    except InputError as e:   # its keys are the fine-tunes', set in pseudo.finetune_config and _overrides
        raise config.ConfigError(f"the iterations' fine-tunes ({cfg.pseudo.finetune_config} + "
                                 f"pseudo.finetune_overrides): {e}") from None


def main(argv=None):
    cfg, rt = stages.STAGES["pseudolabel"].start(argv)
    classes = read_classes(cfg.data.root)
    num_classes = len(classes)
    unlabeled, labeled = read_split(cfg.data.root, "unlabeled"), read_split(cfg.data.root, "labeled")
    load_classifier(cfg.pseudo.model, cfg.data.root)   # a model for this dataset's classes
    schedule, fixmatch_given = balanced_selection.configured_p(cfg.pseudo)
    run = engine.Run("pseudolabel", cfg, rt)   # every check has passed: the first write
    # K classes per image of the dataset's: where K passes the class count (the recipe's 10 of 800 on a pile of
    # 8 classes), every class is a candidate. Set after config.yaml records the K given, which reruns compare.
    if cfg.pseudo.top_k > num_classes:
        run.say(f"pseudo.top_k={cfg.pseudo.top_k} of {num_classes} classes: every class is a candidate")
        cfg.pseudo.top_k = num_classes

    start_val = pseudo_labeling.val_top1(cfg.pseudo.model, cfg, rt)
    iterations = [{"iteration": 0, "model": cfg.pseudo.model, "val_top1": start_val}]
    run.log(iteration=0, val_top1=start_val)
    current = cfg.pseudo.model
    for it, given in enumerate(schedule, start=1):
        p = given.images(len(unlabeled), num_classes)   # fractions resolved against this dataset
        folder = run.path(f"iter{it}")
        pred_dir, csv_path = os.path.join(folder, "predictions"), os.path.join(folder, "pseudo_labels.csv")
        scores = pseudo_labeling.predict(current, unlabeled, labeled, cfg, rt, pred_dir)
        if dist.rank0_decides(lambda: not os.path.exists(csv_path)):   # every rank selects from its own rows
            pseudo_labeling.select(scores, unlabeled, num_classes, given, cfg, rt, csv_path,
                                   os.path.join(folder, "selection.json"))
        dist.barrier()
        summary = engine.read_json(os.path.join(folder, "selection.json"))
        run.say(f"iteration {it}: {given.describe(p, len(unlabeled), num_classes)}, "
                f"{summary['selected']} pseudo-labels, {summary['duplicates']} images "
                f"chosen for >1 class, precision {summary.get('precision')}"
                + landed_outside(summary, summary["selected"], "pseudo-labels"))
        start = cfg.pseudo.backbone if cfg.pseudo.reinitialise else current
        finetune(cfg, os.path.join(folder, "pseudo"), start, cfg.pseudo.pseudo_epochs, csv_path)
        finetune(cfg, os.path.join(folder, "labeled"), os.path.join(folder, "pseudo", "model.pt"),
                 cfg.pseudo.labeled_epochs)
        current = os.path.join(folder, "labeled", "model.pt")
        # not the fine-tune's own val figure: its precision and batch are the fine-tune config's
        val = pseudo_labeling.val_top1(current, cfg, rt)
        iterations.append(pseudo_labeling.iteration_record(it, summary, current, val))
        run.log(**{k: v for k, v in iterations[-1].items() if k != "model"})

    own = max(iterations[1:], key=lambda r: r["val_top1"])   # the first of equals
    kept = keep.write(run, cfg.pseudo.model, start_val, own["val_top1"], f"iteration {own['iteration']}")
    best = own if kept["kept"] == "own" else iterations[0]
    which = "" if best is own else f", {keep.note(kept)} (iteration {own['iteration']})"
    run.say(f"best model by val: iteration {best['iteration']} ({best['val_top1']:.4f}){which}")
    if rt.is_main:   # saved anew, not copied: an old pseudo.model without class names (iteration 0) gains them
        model, arch = load_classifier(best["model"], cfg.data.root)
        save_classifier(model, arch, classes, run.path("model.pt"))
    dist.barrier()
    scores = pseudo_labeling.predict(run.path("model.pt"), unlabeled, labeled, cfg, rt, run.path("predictions"))
    fixmatch = None
    if fixmatch_given:   # every rank selects from its own rows; rank 0 gets the summary
        fixmatch = pseudo_labeling.select(scores, unlabeled, num_classes, fixmatch_given, cfg, rt,
                                          run.path("pseudo_labels.csv"), run.path("fixmatch_selection.json"))
    if fixmatch:
        run.say("FixMatch selection: " + fixmatch_given.describe(fixmatch["p"], len(unlabeled), num_classes)
                + landed_outside(fixmatch, fixmatch["selected"], "pseudo-labels"))
    if rt.is_main:
        engine.write_json(run.path("selection.json"), {"iterations": iterations, "best_iteration": best["iteration"],
                                                       "fixmatch_selection": fixmatch})
    run.log(event="done", best_iteration=best["iteration"], val_top1=best["val_top1"])
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
