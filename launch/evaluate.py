"""Scores what it is given: a classifier (evaluate.model) by top-1/top-5 on val/test at several image
scales and with multi-scale TTA; a backbone (evaluate.backbone) by the kNN top-1 of its embeddings with
the labeled images as references (section knn, as pretrain's kNN monitor). Both may be given.

    python launch/evaluate.py --config configs/demo/evaluate.yaml evaluate.model=RUN/model.pt
    python launch/evaluate.py --config configs/demo/evaluate.yaml evaluate.backbone=RUN/backbone.pt

Writes run.dir/eval.json with the parts that were scored:
    model:    {"model": PATH, "splits": {SPLIT: {"images": N, "scales": {"28": {"top1", "top5"}, ...},
                                                 "tta": {"top1", "top5"}, "tta_scales": [px, ...],
                                                 "tta_mirror": bool}}}
    backbone: {"backbone": PATH, "k": K, "temperature": T, "knn": {SPLIT: top1}}
TTA averages the softmax probabilities of the evaluate.scales views (each image is resized so its
shorter side is the scale): of all of them (evaluate.tta=all, the report's fixed 96/144/192 px), or of
the subset of them with the best val top-1 (evaluate.tta=val; test is then scored with val's choice).
evaluate.mirror adds each view's horizontal mirror: always (tta=all) or as a candidate val chooses.
Every rank scores its shard of a split; only hit counts cross ranks.
"""
from data.datasets import read_classes, read_split
from trainer import dist
from trainer.runtime import config, engine
from trainer.runtime.stages import STAGES
from trainer.algorithms.knn import faiss_gpu, knn_accuracy
from trainer.runtime.loading import eval_loader
from trainer.runtime.models import load_backbone, load_classifier
from trainer.runtime.predict import embed
from trainer.algorithms.tta import best_subset, candidates, hit_counts, top1_top5


def labeled_splits(cfg) -> dict:
    splits = {}
    for name in sorted(cfg.evaluate.splits, key=lambda n: n != "val"):   # val first (see evaluate.tta)
        split = read_split(cfg.data.root, name)
        if split.labels is None:
            raise config.ConfigError(f"evaluate.splits: {name!r} has no label column to score against")
        splits[name] = split
    return splits


def classifier(cfg):
    return load_classifier(cfg.evaluate.model, cfg.data.root)[0]


def evaluate_classifier(cfg, model, splits, rt, run) -> dict:
    model = rt.place(model)
    scales = cfg.evaluate.scales
    tried = candidates(len(scales), cfg.evaluate.tta, cfg.evaluate.mirror)
    results, chosen = {}, tried[-1] if cfg.evaluate.tta == "all" else tried[0]
    for name, split in splits.items():   # val first: in tta=val mode it picks the candidate test is scored with
        loader = eval_loader(split, cfg, rt, cfg.inference.batch_size, scales)
        counts = hit_counts(model, loader, split.labels, len(scales), tried, rt, cfg.inference.precision)
        per_scale, per_candidate = top1_top5(counts, len(scales), tried)
        if name == "val" and cfg.evaluate.tta == "val":
            chosen = best_subset(per_candidate)
        results[name] = {"images": int(counts[0, 2]), "scales": dict(zip(map(str, scales), per_scale)),
                         "tta": per_candidate[chosen], "tta_scales": [scales[i] for i in chosen[0]],
                         "tta_mirror": chosen[1]}
        run.say(f"{name}: top-1 " + ", ".join(f"{s} px {r['top1']:.4f}" for s, r in zip(scales, per_scale))
                + f", TTA over {results[name]['tta_scales']} px{' and their mirrors' if chosen[1] else ''} "
                f"{per_candidate[chosen]['top1']:.4f}")
        run.log(split=name, **{f"top1_{s}": r["top1"] for s, r in zip(scales, per_scale)},
                top1_tta=per_candidate[chosen]["top1"])
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
        if rt.is_main:   # rank 0 holds the embeddings (the others get None)
            results[name] = knn_accuracy(references, labeled.labels, queries, split.labels, num_classes,
                                         cfg.knn.k, cfg.knn.temperature, gpu=faiss_gpu(rt.device))
            run.say(f"{name}: kNN top-1 {results[name]:.4f}")
    return {"backbone": cfg.evaluate.backbone, "k": cfg.knn.k, "temperature": cfg.knn.temperature, "knn": results}


def check(cfg) -> dict:
    """What can be checked before the inputs exist (the pipeline runs it before every stage); the splits."""
    if cfg.evaluate.tta == "val" and "val" not in cfg.evaluate.splits:
        raise config.ConfigError(f"evaluate.tta=val chooses the TTA scales on val: evaluate.splits="
                                 f"{cfg.evaluate.splits} must include val")
    splits = labeled_splits(cfg)
    if not (cfg.evaluate.model or cfg.evaluate.backbone):
        raise config.ConfigError("evaluate.model, evaluate.backbone: give at least one (a model.pt is scored per "
                                 "scale and with TTA, a backbone.pt by kNN)")
    labeled = len(read_split(cfg.data.root, "labeled"))
    if cfg.evaluate.backbone and not 1 <= cfg.knn.k <= labeled:
        raise config.ConfigError(f"knn.k={cfg.knn.k}: expected 1..{labeled} (the labeled images)")
    return splits


def main(argv=None):
    cfg = STAGES["evaluate"].parse(argv)
    splits = check(cfg)
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt)
    model = classifier(cfg) if cfg.evaluate.model else None
    backbone = load_backbone(cfg.evaluate.backbone) if cfg.evaluate.backbone else None
    run = engine.Run("evaluate", cfg, rt)   # every check has passed: the first write
    result, done = {}, {}
    if model is not None:
        result |= evaluate_classifier(cfg, model, splits, rt, run)
        done |= {f"{s}_top1": r["tta"]["top1"] for s, r in result["splits"].items()}
    if backbone is not None:
        result |= evaluate_knn(cfg, backbone, splits, rt, run)
        done |= {f"{s}_knn_top1": v for s, v in result["knn"].items()}
    if rt.is_main:
        engine.write_json(run.path("eval.json"), result)
        run.log(event="done", **done)
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
