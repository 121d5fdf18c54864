"""Balanced pseudo-label iterations: predict -> top-P per class -> fine-tune on pseudo + labeled,
then on labeled only (head re-initialised); P grows each iteration; the best model by val wins. A P
below 1 is a fraction of the unlabeled images per class (balanced_selection.resolve_p), so one config suits any dataset size.
With pseudo.reinitialise=true each iteration's first fine-tune starts from the pretrained pseudo.backbone
instead of the model before it.

    python launch/pseudolabel.py --config configs/demo/pseudolabel.yaml [key=value ...]

Writes in run.dir: iter<i>/ (predictions, pseudo_labels.csv, selection.json, the two fine-tune runs),
model.pt (the best by val), predictions/ of that model, pseudo_labels.csv (its top_k x fixmatch_p
selection, for FixMatch) and selection.json (every iteration's figures; p is the P used, p_given the
configured value it was resolved from).
"""
import os
import shutil

from data.datasets import read_classes, read_split
from launch import finetune as finetune_stage
from trainer.algorithms import balanced_selection, label_propagation
from trainer.runtime import config, dist, engine
from trainer.runtime.config import FinetuneConfig, PseudolabelConfig
from trainer.algorithms.knn import faiss_gpu
from trainer.runtime.loading import eval_loader
from trainer.runtime.models import load_classifier
from trainer.runtime.predict import accuracy, write_predictions


def predict(model_path, unlabeled, labeled, cfg, rt, out_dir):
    """out_dir: the model's top-K and embeddings of the unlabeled images (and, for a scorer that propagates,
    the labeled images' in out_dir/labeled), then the scorer's top-K in out_dir/<scorer>/."""
    model = None
    for split, folder in ((unlabeled, out_dir), (labeled, os.path.join(out_dir, "labeled"))):
        if folder != out_dir and cfg.pseudo.scorer == "classifier":
            break
        if not os.path.exists(os.path.join(folder, "embeddings.npy")):
            model = model or rt.place(load_classifier(model_path)[0])
            write_predictions(model, eval_loader(split, cfg, rt, cfg.inference.batch_size), rt, folder, len(split),
                              cfg.pseudo.top_k, cfg.inference.precision)
    scored = os.path.join(out_dir, cfg.pseudo.scorer)
    if cfg.pseudo.scorer != "classifier" and rt.is_main and not os.path.exists(os.path.join(scored, "topk_prob.npy")):
        p = cfg.propagation
        label_propagation.write_scores(out_dir, labeled.labels, len(read_classes(cfg.data.root)), cfg.pseudo.scorer,
                                       cfg.pseudo.top_k, p.k, p.alpha, p.iterations, p.gamma, faiss_gpu(rt.device),
                                       scored)
    dist.barrier()
    return scored if cfg.pseudo.scorer != "classifier" else out_dir


def val_top1(model_path, cfg, rt) -> float:
    model, _ = load_classifier(model_path)
    return accuracy(rt.place(model), eval_loader(read_split(cfg.data.root, "val"), cfg, rt, cfg.inference.batch_size), rt,
                    cfg.inference.precision)["top1"]


def select_pseudo_labels(pred_dir, unlabeled, num_classes, p, cfg, out_csv, out_json, p_given=None) -> dict:
    """Top-p images per class from the predictions; writes the CSV (path,label,score) and a summary
    (p: the images per class used, p_given: the configured value it was resolved from)."""
    chosen = balanced_selection.select_balanced_from_npy(os.path.join(pred_dir, "topk_class.npy"),
                                                         os.path.join(pred_dir, "topk_prob.npy"), num_classes, p,
                                                         chunk=cfg.pseudo.chunk)
    if cfg.pseudo.class_adaptive:
        chosen = balanced_selection.confidence_adapted(chosen, num_classes)
    summary = {"p": p, "p_given": balanced_selection.as_given(p if p_given is None else p_given), "top_k": cfg.pseudo.top_k,
               **chosen.summary()}
    if unlabeled.hidden_labels is not None:
        summary.update(balanced_selection.selection_precision(chosen, unlabeled.hidden_labels, num_classes))
    balanced_selection.write_pseudo_labels(out_csv, chosen, unlabeled)
    engine.write_json(out_json, summary)
    return summary


def finetune(cfg, run_dir, init, epochs, pseudo_labels=""):
    """One fine-tune with the stage's own code; a finished one (model.pt present) is kept."""
    if not os.path.exists(os.path.join(run_dir, "model.pt")):
        finetune_stage.main(["--config", cfg.pseudo.finetune_config, f"run.dir={run_dir}", f"data.root={cfg.data.root}",
                       f"data.backend={cfg.data.backend}", f"run.device={cfg.run.device}", f"finetune.backbone={init}",
                       f"finetune.pseudo_labels={pseudo_labels}", f"train.epochs={epochs}",
                       *cfg.pseudo.finetune_overrides])
    return engine.read_done(run_dir)["val_top1"]


def check(cfg):
    """What can be checked before the inputs exist (the pipeline runs it before every stage)."""
    num_classes = len(read_classes(cfg.data.root))
    if cfg.pseudo.top_k > num_classes:
        raise config.ConfigError(f"pseudo.top_k={cfg.pseudo.top_k}: expected 1..{num_classes} (the number of classes)")
    if cfg.pseudo.reinitialise and not cfg.pseudo.backbone:
        raise config.ConfigError("pseudo.backbone: required with pseudo.reinitialise=true: "
                                 "the pretrained backbone.pt each iteration starts from")


def main(argv=None):
    cfg = engine.parse(PseudolabelConfig, argv, "Balanced pseudo-label iterations")
    check(cfg)
    num_classes = len(read_classes(cfg.data.root))
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt)
    unlabeled, labeled = read_split(cfg.data.root, "unlabeled"), read_split(cfg.data.root, "labeled")
    if cfg.pseudo.scorer != "classifier" and cfg.propagation.k >= len(unlabeled) + len(labeled):
        raise config.ConfigError(f"propagation.k={cfg.propagation.k}: expected fewer than the "
                                 f"{len(unlabeled) + len(labeled)} labeled + unlabeled images")
    load_classifier(cfg.pseudo.model, num_classes=num_classes)   # a model for this dataset's classes
    # P as images per class: fractions of the unlabeled images per class resolved against this dataset
    schedule = [balanced_selection.resolve_p(given, len(unlabeled), num_classes, f"pseudo.schedule[{i}]")
                for i, given in enumerate(cfg.pseudo.schedule)]
    fixmatch_p = balanced_selection.resolve_p(cfg.pseudo.fixmatch_p, len(unlabeled), num_classes, "pseudo.fixmatch_p") \
        if cfg.pseudo.fixmatch_p else 0
    # the iterations' fine-tune recipe is checked now, not after the first predictions
    config.load(FinetuneConfig, cfg.pseudo.finetune_config,
                [*cfg.pseudo.finetune_overrides, f"finetune.backbone={cfg.pseudo.model}"])
    run = engine.Run("pseudolabel", cfg, rt)   # every check has passed: the first write

    start_val = val_top1(cfg.pseudo.model, cfg, rt)
    iterations = [{"iteration": 0, "model": cfg.pseudo.model, "val_top1": start_val}]
    run.log(iteration=0, val_top1=start_val)
    current = cfg.pseudo.model
    for it, (p, given) in enumerate(zip(schedule, cfg.pseudo.schedule), start=1):
        folder = run.path(f"iter{it}")
        pred_dir, csv_path = os.path.join(folder, "predictions"), os.path.join(folder, "pseudo_labels.csv")
        scores = predict(current, unlabeled, labeled, cfg, rt, pred_dir)
        if rt.is_main and not os.path.exists(csv_path):
            select_pseudo_labels(scores, unlabeled, num_classes, p, cfg, csv_path,
                                 os.path.join(folder, "selection.json"), given)
        dist.barrier()
        summary = engine.read_json(os.path.join(folder, "selection.json"))
        run.say(f"iteration {it}: {balanced_selection.describe_p(p, given, f'pseudo.schedule[{it - 1}]', len(unlabeled), num_classes)}, "
                f"{summary['selected']} pseudo-labels, {summary['duplicates']} images "
                f"chosen for >1 class, precision {summary.get('precision')}")
        start = cfg.pseudo.backbone if cfg.pseudo.reinitialise else current
        finetune(cfg, os.path.join(folder, "pseudo"), start, cfg.pseudo.pseudo_epochs, csv_path)
        val = finetune(cfg, os.path.join(folder, "labeled"),
                       os.path.join(folder, "pseudo", "model.pt"), cfg.pseudo.labeled_epochs)
        current = os.path.join(folder, "labeled", "model.pt")
        iterations.append({"iteration": it, "p": p, "p_given": balanced_selection.as_given(given), "selected": summary["selected"],
                           "duplicates": summary["duplicates"], "precision": summary.get("precision"),
                           "model": current, "val_top1": val})
        run.log(**{k: v for k, v in iterations[-1].items() if k != "model"})

    best = max(iterations, key=lambda r: r["val_top1"])
    run.say(f"best model by val: iteration {best['iteration']} ({best['val_top1']:.4f})")
    if rt.is_main:
        shutil.copyfile(best["model"], run.path("model.pt.tmp"))
        os.replace(run.path("model.pt.tmp"), run.path("model.pt"))
    dist.barrier()
    scores = predict(run.path("model.pt"), unlabeled, labeled, cfg, rt, run.path("predictions"))
    fixmatch = None
    if rt.is_main and fixmatch_p:
        run.say("FixMatch selection: " + balanced_selection.describe_p(fixmatch_p, cfg.pseudo.fixmatch_p, "pseudo.fixmatch_p",
                                                   len(unlabeled), num_classes))
        fixmatch = select_pseudo_labels(scores, unlabeled, num_classes, fixmatch_p, cfg, run.path("pseudo_labels.csv"),
                                        run.path("fixmatch_selection.json"), cfg.pseudo.fixmatch_p)
    if rt.is_main:
        engine.write_json(run.path("selection.json"), {"iterations": iterations, "best_iteration": best["iteration"],
                                                       "fixmatch_selection": fixmatch})
    run.log(event="done", best_iteration=best["iteration"], val_top1=best["val_top1"])
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
