"""FixMatch: cross-entropy on labeled (+ pseudo-labeled) images plus, for each unlabeled image, the
confident prediction on a weak view as the target of a strong view; the weights' EMA is kept.

    python launch/fixmatch.py --config configs/demo/fixmatch.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/fixmatch.py --config configs/paper/fixmatch.yaml

fixmatch.variant names the algorithm, FixMatch or one of its variants (trainer/algorithms/fixmatch.py), or
any algorithm registered by name (trainer/algorithms/semi_supervised.py): this recipe builds the data, the
model and the optimizer, and runs the algorithm's step. An epoch is one pass over the unlabeled images
(fixmatch.mu x train.batch_size per step); the labeled loader cycles through its own epochs alongside.
Writes run.dir/model.pt: of the starting model and each evaluation's EMA and live weights, those best on
val. With fixmatch.bn_batches > 0 the EMA is evaluated (and saved) with BatchNorm statistics of its own weights.
"""

import torch

from data.datasets import labeled_with_pseudo_labels, read_classes, read_split, without
from data.loaders import resolve_backend
from trainer.algorithms import semi_supervised
from trainer.runtime import amp, dist, engine, optim, schedule
from trainer.runtime.stages import STAGES
from trainer.runtime.loading import eval_loader, loader
from trainer.runtime.loop import BestModel, Loop
from trainer.runtime.models import load_classifier, save_classifier
from trainer.runtime.predict import accuracy


def splits(cfg):
    """(labeled + pseudo-labeled, unlabeled without the pseudo-labeled images)."""
    train = labeled_with_pseudo_labels(cfg.data.root, cfg.fixmatch.labeled, cfg.fixmatch.pseudo_labels)
    return train, without(read_split(cfg.data.root, "unlabeled"), train.paths)


def main(argv=None):
    cfg = STAGES["fixmatch"].parse(argv)
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt, cfg.fixmatch.labeled)
    engine.seed_everything(cfg.run.seed)

    num_classes = len(read_classes(cfg.data.root))
    train, unlabeled = splits(cfg)
    B, U = cfg.train.batch_size, cfg.fixmatch.mu * cfg.train.batch_size
    if B % rt.world or B > len(train.paths) or U > len(unlabeled.paths):
        raise engine.StageError(f"train.batch_size={B}: must divide by {rt.world} rank(s), be at most the "
                                f"{len(train.paths)} labeled images and, times fixmatch.mu={cfg.fixmatch.mu}, "
                                f"at most the {len(unlabeled.paths)} unlabeled images")
    labeled_loader = loader(train, "weak", cfg, rt, global_batch=B)   # FixMatch: ℓs on weak views
    # Another seed for the unlabeled loader: its augmentations are not drawn in step with the labeled ones.
    unlabeled_loader = loader(unlabeled, "weak_strong", cfg, rt, global_batch=U, seed=cfg.run.seed + 1)
    val_loader = eval_loader(read_split(cfg.data.root, "val"), cfg, rt, U)
    bn_loader = (loader(unlabeled, "eval", cfg, rt, global_batch=U, seed=cfg.run.seed + 2)
                 if cfg.fixmatch.bn_batches else None)
    hidden = None if unlabeled.hidden_labels is None else torch.as_tensor(unlabeled.hidden_labels).to(rt.device)

    model, arch = load_classifier(cfg.fixmatch.model, num_classes=num_classes)
    model = rt.place(dist.sync_batchnorm(model))
    optimizer = optim.classifier_sgd(model, cfg.sgd.lr_backbone, cfg.sgd.lr_head, cfg.sgd.weight_decay,
                                     cfg.sgd.momentum, cfg.sgd.nesterov)
    rank_batch = ((B + 2 * U) // rt.world, 3, cfg.data.image_size, cfg.data.image_size)   # [labeled, weak, strong]
    precision, measured = amp.resolve_precision(cfg.train.precision, model, rank_batch, rt)
    scaler = amp.grad_scaler(precision, rt.device)
    algorithm = semi_supervised.ALGORITHMS[cfg.fixmatch.variant](semi_supervised.Setup(
        cfg, rt, model, optimizer, scaler, precision, num_classes, len(unlabeled.paths), hidden))
    run = engine.Run("fixmatch", cfg, rt)   # every check has passed: the first write
    total, warmup = schedule.plan(cfg.train.epochs, cfg.train.max_steps, cfg.sgd.warmup_epochs,
                                  unlabeled_loader.steps_per_epoch)
    best = BestModel()
    loop = Loop(run, unlabeled_loader, optimizer, {"model": model, "optimizer": optimizer, "scaler": scaler,
                                                   "best": best, **algorithm.state},
                total=total, warmup=warmup, images_per_step=B + 2 * U, final_lr_factor=0.0)
    resumed = loop.resume()
    ddp = dist.wrap_ddp(model, rt)   # after resume: DDP starts every rank from rank 0's weights
    run.say(f"{len(train.paths)} labeled images ({train.name}), {len(unlabeled.paths)} unlabeled, {rt.world} "
            f"rank(s), batch {B} + {cfg.fixmatch.mu}x{B} unlabeled, {unlabeled_loader.steps_per_epoch} steps/epoch, "
            f"{total} steps, backend {resolve_backend(cfg.data.backend)}, {cfg.fixmatch.variant}"
            f"{' + distribution alignment' if cfg.fixmatch.distribution_alignment else ''}, from {cfg.fixmatch.model}, "
            f"{amp.describe_precision(precision, measured)}")
    if not resumed:   # the starting model competes too: an epoch must beat it on val to replace it
        val = accuracy(model, val_loader, rt, precision)
        run.log(epoch=0, step=0, val_top1=val["top1"], val_top5=val["top5"])
        run.say(f"val top-1 at initialisation: {val['top1']:.4f}")
        best.offer(val["top1"], 0, model, "start")
    labeled_batches = labeled_loader.stream(loop.step)   # the labeled epochs run alongside

    def evaluate(epoch, step, img_s) -> dict:
        event = {**algorithm.summarise_epoch(), "img_s": round(img_s, 1)}
        if epoch % cfg.fixmatch.eval_every and step < total:
            return event
        val = algorithm.validate(val_loader, bn_loader, best, epoch)
        run.say(f"epoch {epoch}: val top-1 {val['val_top1']:.4f}, EMA {val['val_top1_ema']:.4f}; mask rate "
                f"{event['mask_rate']:.3f}, pseudo-label accuracy {event.get('pseudo_acc')}, {img_s:.0f} img/s")
        return {**event, **val}

    loop.run_epochs(lambda batch, step: algorithm.train_step(ddp, next(labeled_batches), batch, step), evaluate)

    model.load_state_dict(best.weights)
    run.log(event="done", best_epoch=best.epoch, best_weights=best.source, val_top1=best.top1)   # before model.pt: see pipeline
    if rt.is_main:
        save_classifier(model, arch, run.path("model.pt"))
    dist.barrier()   # in-process callers read model.pt on every rank next
    which = f"epoch {best.epoch}, {best.source} weights" if best.epoch else "the starting model (no epoch beat it)"
    run.say(f"best val top-1 {best.top1:.4f}: {which}; wrote {run.path('model.pt')}")


if __name__ == "__main__":
    engine.cli(main)
