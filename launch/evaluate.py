"""Top-1/top-5 of a classifier on val/test at several image scales and with multi-scale TTA,
or (--knn) the kNN top-1 of a backbone's embeddings with the labeled images as references.

    python launch/evaluate.py --config configs/demo/evaluate.yaml [key=value ...]
    python launch/evaluate.py --config configs/demo/evaluate.yaml --knn [key=value ...]   # = evaluate.knn=true

Writes run.dir/eval.json:
    {"model": PATH, "splits": {SPLIT: {"images": N, "scales": {"28": {"top1", "top5"}, ...},
                                       "tta": {"top1", "top5"}, "tta_scales": [px, ...]}}}
    --knn: {"backbone": PATH, "k": K, "temperature": T, "knn": {SPLIT: top1}}
TTA averages the softmax probabilities of the evaluate.scales views (each image is resized so its
shorter side is the scale): of all of them (evaluate.tta=all, the report's fixed 96/144/192 px), or of
the subset of them with the best val top-1 (evaluate.tta=val; test is then scored with val's choice).
Every rank scores its shard of a split; only hit counts cross ranks.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.datasets import read_classes, read_split  # noqa: E402
from trainer import config, dist, engine  # noqa: E402
from trainer.config import EvaluateConfig  # noqa: E402
from trainer.knn import faiss_gpu, knn_accuracy  # noqa: E402
from trainer.loading import eval_loader  # noqa: E402
from trainer.models import load_backbone, load_classifier  # noqa: E402
from trainer.predict import embed  # noqa: E402
from trainer.tta import best_subset, hit_counts, scale_subsets, top1_top5  # noqa: E402


def labeled_splits(cfg) -> dict:
    splits = {}
    for name in sorted(cfg.evaluate.splits, key=lambda n: n != "val"):   # val first (see evaluate.tta)
        split = read_split(cfg.data.root, name)
        if split.labels is None:
            raise config.ConfigError(f"evaluate.splits: {name!r} has no label column to score against")
        splits[name] = split
    return splits


def classifier(cfg):
    return load_classifier(cfg.evaluate.model, num_classes=len(read_classes(cfg.data.root)))[0]


def evaluate_classifier(cfg, model, splits, rt, run) -> dict:
    model = rt.place(model)
    scales, subsets = cfg.evaluate.scales, scale_subsets(len(cfg.evaluate.scales), cfg.evaluate.tta)
    results, chosen = {}, subsets[0]
    for name, split in splits.items():   # val first: in tta=val mode it picks the subset test is scored with
        loader = eval_loader(split, cfg, rt, cfg.inference.batch_size, scales)
        counts = hit_counts(model, loader, split.labels, len(scales), subsets, rt, cfg.inference.precision)
        per_scale, per_subset = top1_top5(counts, len(scales), subsets)
        if name == "val":
            chosen = best_subset(per_subset)
        results[name] = {"images": int(counts[0, 2]), "scales": dict(zip(map(str, scales), per_scale)),
                         "tta": per_subset[chosen], "tta_scales": [scales[i] for i in chosen]}
        run.say(f"{name}: top-1 " + ", ".join(f"{s} px {r['top1']:.4f}" for s, r in zip(scales, per_scale))
                + f", TTA over {results[name]['tta_scales']} px {per_subset[chosen]['top1']:.4f}")
        run.log(split=name, **{f"top1_{s}": r["top1"] for s, r in zip(scales, per_scale)},
                top1_tta=per_subset[chosen]["top1"])
    return {"model": cfg.evaluate.model, "splits": results}


def evaluate_knn(cfg, network, splits, rt, run) -> dict:
    labeled = read_split(cfg.data.root, "labeled")
    network = rt.place(network)
    precision = cfg.inference.precision
    references = embed(network, eval_loader(labeled, cfg, rt, cfg.inference.batch_size), rt, len(labeled), precision)
    num_classes = len(read_classes(cfg.data.root))
    results = {}
    for name, split in splits.items():
        queries = embed(network, eval_loader(split, cfg, rt, cfg.inference.batch_size), rt, len(split), precision)
        if rt.is_main:   # every rank holds the embeddings; one search is enough
            results[name] = knn_accuracy(references, labeled.labels, queries, split.labels, num_classes,
                                         cfg.evaluate.k, cfg.evaluate.temperature, gpu=faiss_gpu(rt.device))
            run.say(f"{name}: kNN top-1 {results[name]:.4f}")
    return {"backbone": cfg.evaluate.backbone, "k": cfg.evaluate.k, "temperature": cfg.evaluate.temperature,
            "knn": results}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--knn" in argv:   # a flag for the common case; overrides stay positional at the end
        argv = [a for a in argv if a != "--knn"] + ["evaluate.knn=true"]
    cfg = engine.parse(EvaluateConfig, argv, "Top-1/top-5 per scale and with multi-scale TTA, or kNN top-1")
    if cfg.evaluate.tta == "val" and "val" not in cfg.evaluate.splits:
        raise config.ConfigError(f"evaluate.tta=val chooses the TTA scales on val: evaluate.splits="
                                 f"{cfg.evaluate.splits} must include val")
    splits = labeled_splits(cfg)
    labeled = len(read_split(cfg.data.root, "labeled"))
    if cfg.evaluate.knn and not 1 <= cfg.evaluate.k <= labeled:
        raise config.ConfigError(f"evaluate.k={cfg.evaluate.k}: expected 1..{labeled} (the labeled images)")
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt)
    network = load_backbone(cfg.evaluate.backbone) if cfg.evaluate.knn else classifier(cfg)
    run = engine.Run("evaluate", cfg, rt)   # every check has passed: the first write
    result = (evaluate_knn if cfg.evaluate.knn else evaluate_classifier)(cfg, network, splits, rt, run)
    if rt.is_main:
        engine.write_json(run.path("eval.json"), result)
        top1 = result["knn"] if cfg.evaluate.knn else {s: r["tta"]["top1"] for s, r in result["splits"].items()}
        run.log(event="done", mode="knn" if cfg.evaluate.knn else "tta", **{f"{s}_top1": v for s, v in top1.items()})
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
