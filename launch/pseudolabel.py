"""Balanced pseudo-label iterations: predict -> top-P per class -> fine-tune on pseudo + labeled,
then on labeled only (head re-initialised); P grows each iteration; the best model by val wins.

    python launch/pseudolabel.py --config configs/demo/pseudolabel.yaml [key=value ...]

Writes in run.dir: iter<i>/ (predictions, pseudo_labels.csv, selection.json, the two fine-tune runs),
model.pt (the best by val), predictions/ of that model, pseudo_labels.csv (its top_k x fixmatch_p
selection, for FixMatch) and selection.json (every iteration's figures).
"""
import os
import shutil

import numpy as np

from data.datasets import read_classes, read_split
from launch import finetune as finetune_stage
from trainer import balanced_selection, config, dist, engine, label_propagation
from trainer.config import FinetuneConfig, PseudolabelConfig
from trainer.knn import faiss_gpu
from trainer.loading import eval_loader
from trainer.models import load_classifier
from trainer.predict import accuracy, write_predictions


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
        write_scores(out_dir, labeled, cfg, rt, scored)
    dist.barrier()
    return scored if cfg.pseudo.scorer != "classifier" else out_dir


def write_scores(pred_dir, labeled, cfg, rt, out_dir):
    """Label propagation from the labeled images over the kNN graph of both sets' embeddings; scorer "mean"
    averages its distribution with the classifier's (its top-K, zero elsewhere)."""
    unlabeled_emb = np.load(os.path.join(pred_dir, "embeddings.npy"))
    embeddings = np.concatenate([unlabeled_emb, np.load(os.path.join(pred_dir, "labeled", "embeddings.npy"))])
    num_classes = len(read_classes(cfg.data.root))
    p = cfg.propagation
    result = label_propagation.propagate(embeddings, np.arange(len(unlabeled_emb), len(embeddings)), labeled.labels,
                                         num_classes, p.k, p.alpha, p.iterations, p.gamma, gpu=faiss_gpu(rt.device))
    probs = result.probabilities[:len(unlabeled_emb)]
    if cfg.pseudo.scorer == "mean":
        classifier = np.zeros_like(probs)
        np.put_along_axis(classifier, np.load(os.path.join(pred_dir, "topk_class.npy")).astype(np.int64),
                          np.load(os.path.join(pred_dir, "topk_prob.npy")), axis=1)
        probs = (probs + classifier) / 2
    classes, scores = label_propagation.top_k(probs, cfg.pseudo.top_k, result.reached[:len(unlabeled_emb)])
    os.makedirs(out_dir, exist_ok=True)
    for name, array in (("topk_class.npy", classes.astype(np.int32)), ("topk_prob.npy", scores)):
        np.save(os.path.join(out_dir, name + ".tmp.npy"), array)
        os.replace(os.path.join(out_dir, name + ".tmp.npy"), os.path.join(out_dir, name))


def val_top1(model_path, cfg, rt) -> float:
    model, _ = load_classifier(model_path)
    return accuracy(rt.place(model), eval_loader(read_split(cfg.data.root, "val"), cfg, rt, cfg.inference.batch_size), rt,
                    cfg.inference.precision)["top1"]


def select_pseudo_labels(pred_dir, unlabeled, num_classes, p, cfg, out_csv, out_json) -> dict:
    """Top-p images per class from the predictions; writes the CSV (path,label,score) and a summary."""
    chosen = balanced_selection.select_balanced_from_npy(os.path.join(pred_dir, "topk_class.npy"),
                                                         os.path.join(pred_dir, "topk_prob.npy"), num_classes, p,
                                                         chunk=cfg.pseudo.chunk)
    if cfg.pseudo.class_adaptive:
        chosen = balanced_selection.confidence_adapted(chosen, num_classes)
    summary = {"p": p, "top_k": cfg.pseudo.top_k, **chosen.summary()}
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


def main(argv=None):
    cfg = engine.parse(PseudolabelConfig, argv, "Balanced pseudo-label iterations")
    num_classes = len(read_classes(cfg.data.root))
    if cfg.pseudo.top_k > num_classes:
        raise config.ConfigError(f"pseudo.top_k={cfg.pseudo.top_k}: expected 1..{num_classes} (the number of classes)")
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt)
    unlabeled, labeled = read_split(cfg.data.root, "unlabeled"), read_split(cfg.data.root, "labeled")
    if cfg.pseudo.scorer != "classifier" and cfg.propagation.k >= len(unlabeled) + len(labeled):
        raise config.ConfigError(f"propagation.k={cfg.propagation.k}: expected fewer than the "
                                 f"{len(unlabeled) + len(labeled)} labeled + unlabeled images")
    load_classifier(cfg.pseudo.model, num_classes=num_classes)   # a model for this dataset's classes
    # the iterations' fine-tune recipe is checked now, not after the first predictions
    config.load(FinetuneConfig, cfg.pseudo.finetune_config,
                [*cfg.pseudo.finetune_overrides, f"finetune.backbone={cfg.pseudo.model}"])
    run = engine.Run("pseudolabel", cfg, rt)   # every check has passed: the first write

    start_val = val_top1(cfg.pseudo.model, cfg, rt)
    iterations = [{"iteration": 0, "model": cfg.pseudo.model, "val_top1": start_val}]
    run.log(iteration=0, val_top1=start_val)
    current = cfg.pseudo.model
    for it, p in enumerate(cfg.pseudo.schedule, start=1):
        folder = run.path(f"iter{it}")
        pred_dir, csv_path = os.path.join(folder, "predictions"), os.path.join(folder, "pseudo_labels.csv")
        scores = predict(current, unlabeled, labeled, cfg, rt, pred_dir)
        if rt.is_main and not os.path.exists(csv_path):
            select_pseudo_labels(scores, unlabeled, num_classes, p, cfg, csv_path,
                                 os.path.join(folder, "selection.json"))
        dist.barrier()
        summary = engine.read_json(os.path.join(folder, "selection.json"))
        run.say(f"iteration {it}: P={p}, {summary['selected']} pseudo-labels, {summary['duplicates']} images "
                f"chosen for >1 class, precision {summary.get('precision')}")
        finetune(cfg, os.path.join(folder, "pseudo"), current, cfg.pseudo.pseudo_epochs, csv_path)
        val = finetune(cfg, os.path.join(folder, "labeled"),
                       os.path.join(folder, "pseudo", "model.pt"), cfg.pseudo.labeled_epochs)
        current = os.path.join(folder, "labeled", "model.pt")
        iterations.append({"iteration": it, "p": p, "selected": summary["selected"],
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
    if rt.is_main and cfg.pseudo.fixmatch_p:
        fixmatch = select_pseudo_labels(scores, unlabeled, num_classes, cfg.pseudo.fixmatch_p, cfg,
                                        run.path("pseudo_labels.csv"), run.path("fixmatch_selection.json"))
    if rt.is_main:
        engine.write_json(run.path("selection.json"), {"iterations": iterations, "best_iteration": best["iteration"],
                                                       "fixmatch_selection": fixmatch})
    run.log(event="done", best_iteration=best["iteration"], val_top1=best["val_top1"])
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
