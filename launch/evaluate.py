"""Top-1/top-5 of a classifier on val/test at several image scales and with multi-scale TTA,
or (--knn) the kNN top-1 of a backbone's embeddings with the labeled images as references.

    python launch/evaluate.py --config configs/demo/evaluate.yaml [key=value ...]
    python launch/evaluate.py --config configs/demo/evaluate.yaml --knn [key=value ...]   # = evaluate.knn=true

Writes run.dir/eval.json:
    {"model": PATH, "splits": {SPLIT: {"images": N, "scales": {"28": {"top1", "top5"}, ...},
                                       "tta": {"top1", "top5"}}}}
    --knn: {"backbone": PATH, "k": K, "temperature": T, "knn": {SPLIT: top1}}
TTA averages the softmax probabilities of the evaluate.scales views (each image is resized so its
shorter side is the scale). Every rank scores its shard of a split; only hit counts cross ranks.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402

from data.datasets import read_classes, read_split  # noqa: E402
from data.loaders import build_loader, resolve_backend  # noqa: E402
from trainer import config, dist, engine  # noqa: E402
from trainer.config import EvaluateConfig  # noqa: E402
from trainer.knn import knn_accuracy  # noqa: E402
from trainer.models import build_backbone, load_backbone_weights, load_classifier  # noqa: E402
from trainer.predict import embed, outputs  # noqa: E402


def tta_probabilities(per_scale: torch.Tensor) -> torch.Tensor:
    """(scales, N, C) softmax probabilities -> (N, C) their mean over the scales."""
    return per_scale.mean(0)


def scale_probabilities(model, views) -> torch.Tensor:
    """(scales, N, C): the model's softmax on each scale's view of the batch."""
    return torch.stack([torch.softmax(model(v).float(), 1) for v in views])


@torch.no_grad()
def hit_counts(model, loader, labels, num_scales, rt, precision) -> torch.Tensor:
    """(scales + 1, 3) top-1 hits, top-5 hits and images per scale and (last row) for TTA, summed over ranks."""
    model.eval()
    counts = torch.zeros(num_scales + 1, 3, dtype=torch.float64)
    for index, per_scale in outputs(lambda views: scale_probabilities(model, views), loader, rt, precision):
        probs = torch.cat([per_scale, tta_probabilities(per_scale)[None]])
        y = torch.from_numpy(labels[index.numpy()])
        hit = probs.topk(min(5, probs.shape[2]), dim=2).indices == y[None, :, None]
        batch = torch.stack([hit[..., 0].sum(1), hit.any(2).sum(1), torch.full((len(probs),), len(y))], 1)
        counts += batch.double()
    if dist.world_size() > 1:
        torch_dist.all_reduce(counts)
    return counts


def labeled_splits(cfg) -> dict:
    splits = {}
    for name in cfg.evaluate.splits:
        split = read_split(cfg.data.root, name)
        if split.labels is None:
            raise config.ConfigError(f"evaluate.splits: {name!r} has no label column to score against")
        splits[name] = split
    return splits


def eval_loader(split, cfg, rt, scales=None):
    return build_loader(split, "eval", image_size=cfg.data.image_size, global_batch=cfg.inference.batch_size,
                        rank=rt.rank, world=rt.world, shuffle=False, drop_last=False, workers=cfg.data.workers,
                        backend=resolve_backend(cfg.data.backend), on_bad_image=cfg.data.on_bad_image,
                        scales=scales)


def evaluate_classifier(cfg, splits, rt, run) -> dict:
    model, arch = load_classifier(cfg.evaluate.model)
    num_classes = len(read_classes(cfg.data.root))
    if arch["num_classes"] != num_classes:
        raise engine.StageError(f"{cfg.evaluate.model}: a {arch['num_classes']}-class model, but "
                                f"{cfg.data.root}/classes.txt names {num_classes} classes")
    model.to(rt.device)
    scales = cfg.evaluate.scales
    results = {}
    for name, split in splits.items():
        counts = hit_counts(model, eval_loader(split, cfg, rt, scales), split.labels, len(scales), rt,
                            cfg.inference.precision)
        scores = [{"top1": (c[0] / c[2]).item(), "top5": (c[1] / c[2]).item()} for c in counts]
        results[name] = {"images": int(counts[0, 2]), "scales": dict(zip(map(str, scales), scores)),
                         "tta": scores[-1]}
        run.say(f"{name}: top-1 " + ", ".join(f"{s} px {r['top1']:.4f}" for s, r in zip(scales, scores))
                + f", TTA {scores[-1]['top1']:.4f}")
        run.log(split=name, **{f"top1_{s}": r["top1"] for s, r in zip(scales, scores)}, top1_tta=scores[-1]["top1"])
    return {"model": cfg.evaluate.model, "splits": results}


def evaluate_knn(cfg, splits, rt, run) -> dict:
    labeled = read_split(cfg.data.root, "labeled")
    if not 1 <= cfg.evaluate.k <= len(labeled):
        raise config.ConfigError(f"evaluate.k={cfg.evaluate.k}: expected 1..{len(labeled)} (the labeled images)")
    backbone = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width)
    load_backbone_weights(backbone, cfg.evaluate.backbone)
    backbone.to(rt.device)
    precision = cfg.inference.precision
    references = embed(backbone, eval_loader(labeled, cfg, rt), rt, len(labeled), precision)
    num_classes = len(read_classes(cfg.data.root))
    results = {}
    for name, split in splits.items():
        queries = embed(backbone, eval_loader(split, cfg, rt), rt, len(split), precision)
        if rt.is_main:   # every rank holds the embeddings; one search is enough (and faiss-GPU uses device 0)
            results[name] = knn_accuracy(references, labeled.labels, queries, split.labels, num_classes,
                                         cfg.evaluate.k, cfg.evaluate.temperature)
            run.say(f"{name}: kNN top-1 {results[name]:.4f}")
    return {"backbone": cfg.evaluate.backbone, "k": cfg.evaluate.k, "temperature": cfg.evaluate.temperature,
            "knn": results}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--knn" in argv:   # a flag for the common case; overrides stay positional at the end
        argv = [a for a in argv if a != "--knn"] + ["evaluate.knn=true"]
    cfg = engine.parse(EvaluateConfig, argv, "Top-1/top-5 per scale and with multi-scale TTA, or kNN top-1")
    if not cfg.evaluate.scales or min(cfg.evaluate.scales) <= 0:
        raise config.ConfigError(f"evaluate.scales={cfg.evaluate.scales}: expected a list of positive sizes (px)")
    if not cfg.evaluate.splits:
        raise config.ConfigError("evaluate.splits: expected at least one split (e.g. [val, test])")
    splits = labeled_splits(cfg)
    rt = dist.init()
    run = engine.Run("evaluate", cfg, rt)
    result = (evaluate_knn if cfg.evaluate.knn else evaluate_classifier)(cfg, splits, rt, run)
    if rt.is_main:
        engine.write_json(run.path("eval.json"), result)
        top1 = result["knn"] if cfg.evaluate.knn else {s: r["tta"]["top1"] for s, r in result["splits"].items()}
        run.log(event="done", mode="knn" if cfg.evaluate.knn else "tta", **{f"{s}_top1": v for s, v in top1.items()})
    dist.barrier()


if __name__ == "__main__":
    engine.cli(main)
