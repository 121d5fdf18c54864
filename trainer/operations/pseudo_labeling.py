"""The pieces of one balanced pseudo-label iteration (launch/pseudolabel.py is the recipe): a model's
predictions of the unlabeled (and labeled) images on disk and the configured scorer's top-K, its val top-1,
and the balanced top-P selection written as a CSV with its summary."""
import os

from data.datasets import read_classes, read_split
from data.labels import outside_classes
from trainer.algorithms import balanced_selection, label_propagation
from trainer.algorithms.knn import faiss_gpu
from trainer import dist
from trainer.runtime import engine
from trainer.runtime.loading import eval_loader
from trainer.runtime.models import load_classifier
from trainer.runtime.predict import SHARDS, accuracy, top_k_share, write_predictions


def predict(model_path, unlabeled, labeled, cfg, rt, out_dir):
    """out_dir: the model's top-K of the unlabeled images, then for a scorer that propagates their embeddings
    and the labeled images' (out_dir/labeled), its one reader, and the scorer's top-K in out_dir/<scorer>/."""
    model = None
    propagates = cfg.pseudo.scorer != "classifier"
    for split, folder in ((unlabeled, out_dir), (labeled, os.path.join(out_dir, "labeled"))):
        if folder != out_dir and not propagates:
            break
        if not os.path.exists(os.path.join(folder, SHARDS)):
            model = model or rt.place(load_classifier(model_path)[0])
            write_predictions(model, eval_loader(split, cfg, rt, cfg.inference.batch_size), rt, folder, len(split),
                              cfg.pseudo.top_k, cfg.inference.precision, embeddings=propagates)
    scored = os.path.join(out_dir, cfg.pseudo.scorer)

    if propagates and dist.rank0_decides(lambda: not os.path.exists(os.path.join(scored, "topk_prob.npy"))):
        p = cfg.propagation   # every rank searches its share of the neighbours, rank 0 solves and writes
        label_propagation.write_scores(out_dir, labeled.labels, len(read_classes(cfg.data.root)), cfg.pseudo.scorer,
                                       cfg.pseudo.top_k, p.k, p.alpha, p.iterations, p.gamma, faiss_gpu(rt.device),
                                       scored)
    dist.barrier()
    return scored if propagates else out_dir


def val_top1(model_path, cfg, rt) -> float:
    model, _ = load_classifier(model_path)
    return accuracy(rt.place(model), eval_loader(read_split(cfg.data.root, "val"), cfg, rt, cfg.inference.batch_size), rt,
                    cfg.inference.precision)["top1"]


def iteration_record(iteration: int, summary: dict, model: str, val_top1: float) -> dict:
    """An iteration's line of selection.json and its event: its selection's summary (`select`), the model it
    ended with and that model's val top-1."""
    return {"iteration": iteration, "p": summary["p"], "p_given": summary["p_given"], "selected": summary["selected"],
            "duplicates": summary["duplicates"], "precision": summary.get("precision"),
            # the balance of the selection, as scalars a tracker can draw
            "fewest_per_class": min(summary["class_counts"]), "most_per_class": max(summary["class_counts"]),
            **({"outside_classes": summary["outside_classes"]} if "outside_classes" in summary else {}),
            "model": model, "val_top1": val_top1}


def select(pred_dir, unlabeled, num_classes, given, cfg, rt, out_csv, out_json) -> dict | None:
    """Top-P images per class from the predictions, P = `given` (a balanced_selection.ConfiguredP) resolved
    against the unlabeled images. Every rank calls it: each selects from its share of the rows, rank 0 from
    their candidates (balanced_selection.select_across_ranks), and writes the CSV (path,label,score) and a
    summary (p: the images per class used, p_given: the configured value it was resolved from), which it
    returns; the other ranks get None."""
    p = given.images(len(unlabeled), num_classes)
    chosen = balanced_selection.select_across_ranks(top_k_share(pred_dir, rt.rank, rt.world), num_classes, p,
                                                    chunk=cfg.pseudo.chunk)
    if chosen is None:
        return None
    if cfg.pseudo.class_adaptive:
        chosen = balanced_selection.confidence_adapted(chosen, num_classes)
    summary = {"p": p, "p_given": given.recorded(), "top_k": cfg.pseudo.top_k,
               **chosen.summary()}
    if unlabeled.hidden_labels is not None:
        summary.update(balanced_selection.selection_precision(chosen, unlabeled.hidden_labels, num_classes))
        summary.update(outside_classes(unlabeled.hidden_labels, unlabeled.hidden_labels[chosen.indices]))
    balanced_selection.write_pseudo_labels(out_csv, chosen, unlabeled)
    engine.write_json(out_json, summary)
    return summary
