"""Balanced pseudo-label iterations: predict -> top-P per class -> fine-tune on pseudo + labeled,
then on labeled only (head re-initialised); P grows each iteration; the best model by val wins.

    python launch/pseudolabel.py --config configs/demo/pseudolabel.yaml [key=value ...]

Writes in run.dir: iter<i>/ (predictions, pseudo_labels.csv, selection.json, the two fine-tune runs),
model.pt (the best by val), predictions/ of that model, pseudo_labels.csv (its top_k x fixmatch_p
selection, for FixMatch) and selection.json (every iteration's figures).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shutil  # noqa: E402

from data.datasets import read_classes, read_split  # noqa: E402
from launch._stages import stage_module  # noqa: E402
from trainer import balanced_selection, config, dist, engine  # noqa: E402
from trainer.config import FinetuneConfig, PseudolabelConfig  # noqa: E402
from trainer.loading import eval_loader  # noqa: E402
from trainer.models import load_classifier  # noqa: E402
from trainer.predict import accuracy, write_predictions  # noqa: E402


def predict(model_path, unlabeled, cfg, rt, out_dir):
    if os.path.exists(os.path.join(out_dir, "embeddings.npy")):
        return
    model, _ = load_classifier(model_path)
    write_predictions(rt.place(model), eval_loader(unlabeled, cfg, rt, cfg.inference.batch_size), rt, out_dir, len(unlabeled),
                      cfg.pseudo.top_k, cfg.inference.precision)


def val_top1(model_path, cfg, rt) -> float:
    model, _ = load_classifier(model_path)
    return accuracy(rt.place(model), eval_loader(read_split(cfg.data.root, "val"), cfg, rt, cfg.inference.batch_size), rt,
                    cfg.inference.precision)["top1"]


def select_pseudo_labels(pred_dir, unlabeled, num_classes, p, cfg, out_csv, out_json) -> dict:
    """Top-p images per class from the predictions; writes the CSV (path,label,score) and a summary."""
    chosen = balanced_selection.select_balanced_from_npy(os.path.join(pred_dir, "topk_class.npy"),
                                                         os.path.join(pred_dir, "topk_prob.npy"), num_classes, p,
                                                         chunk=cfg.pseudo.chunk)
    summary = {"p": p, "top_k": cfg.pseudo.top_k, **chosen.summary()}
    if unlabeled.hidden_labels is not None:
        summary.update(balanced_selection.selection_precision(chosen, unlabeled.hidden_labels, num_classes))
    balanced_selection.write_pseudo_labels(out_csv, chosen, unlabeled)
    engine.write_json(out_json, summary)
    return summary


def finetune(finetune_main, cfg, run_dir, init, epochs, pseudo_labels=""):
    """One fine-tune with the stage's own code; a finished one (model.pt present) is kept."""
    if not os.path.exists(os.path.join(run_dir, "model.pt")):
        finetune_main(["--config", cfg.pseudo.finetune_config, f"run.dir={run_dir}", f"data.root={cfg.data.root}",
                       f"data.backend={cfg.data.backend}", f"run.device={cfg.run.device}", f"finetune.init={init}",
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
    unlabeled = read_split(cfg.data.root, "unlabeled")
    load_classifier(cfg.pseudo.model, num_classes=num_classes)   # a model for this dataset's classes
    # the iterations' fine-tune recipe is checked now, not after the first predictions
    config.load(FinetuneConfig, cfg.pseudo.finetune_config, cfg.pseudo.finetune_overrides)
    finetune_main = stage_module("finetune").main
    run = engine.Run("pseudolabel", cfg, rt)   # every check has passed: the first write

    start_val = val_top1(cfg.pseudo.model, cfg, rt)
    iterations = [{"iteration": 0, "model": cfg.pseudo.model, "val_top1": start_val}]
    run.log(iteration=0, val_top1=start_val)
    current = cfg.pseudo.model
    for it, p in enumerate(cfg.pseudo.schedule, start=1):
        folder = run.path(f"iter{it}")
        pred_dir, csv_path = os.path.join(folder, "predictions"), os.path.join(folder, "pseudo_labels.csv")
        predict(current, unlabeled, cfg, rt, pred_dir)
        if rt.is_main and not os.path.exists(csv_path):
            select_pseudo_labels(pred_dir, unlabeled, num_classes, p, cfg, csv_path,
                                 os.path.join(folder, "selection.json"))
        dist.barrier()
        summary = engine.read_json(os.path.join(folder, "selection.json"))
        run.say(f"iteration {it}: P={p}, {summary['selected']} pseudo-labels, {summary['duplicates']} images "
                f"chosen for >1 class, precision {summary.get('precision')}")
        finetune(finetune_main, cfg, os.path.join(folder, "pseudo"), current, cfg.pseudo.pseudo_epochs, csv_path)
        val = finetune(finetune_main, cfg, os.path.join(folder, "labeled"),
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
    predict(run.path("model.pt"), unlabeled, cfg, rt, run.path("predictions"))
    fixmatch = None
    if rt.is_main and cfg.pseudo.fixmatch_p:
        fixmatch = select_pseudo_labels(run.path("predictions"), unlabeled, num_classes, cfg.pseudo.fixmatch_p, cfg,
                                        run.path("pseudo_labels.csv"), run.path("fixmatch_selection.json"))
    if rt.is_main:
        engine.write_json(run.path("selection.json"), {"iterations": iterations, "best_iteration": best["iteration"],
                                                       "fixmatch_selection": fixmatch})
    run.log(event="done", best_iteration=best["iteration"], val_top1=best["val_top1"])
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
