"""FixMatch: cross-entropy on labeled (+ pseudo-labeled) images plus, for each unlabeled image, the
confident prediction on a weak view as the target of a strong view; the weights' EMA is kept.

    python launch/fixmatch.py --config configs/demo/fixmatch.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/fixmatch.py --config configs/paper/fixmatch.yaml

An epoch is one pass over the unlabeled images (fixmatch.mu x train.batch_size per step); the labeled
loader cycles through its own epochs alongside. Writes run.dir/model.pt: the EMA weights of the
epoch with the best EMA val top-1, or the starting model when no epoch beats it on val. With
fixmatch.bn_batches > 0 the EMA is evaluated (and saved) with BatchNorm statistics of its own weights.
"""

import torch

from data.datasets import labeled_with_pseudo_labels, read_classes, read_split, without
from data.loaders import resolve_backend
from trainer.algorithms import batchnorm
from trainer.runtime import dist, engine, optim, schedule
from trainer.runtime.config import FixmatchConfig
from trainer.algorithms.ema import EMA
from trainer.algorithms.fixmatch import EPOCH_SUMS, epoch_summary, fixmatch_loss, make_pseudo_labeler, step_sums
from trainer.runtime.loading import eval_loader, loader
from trainer.runtime.loop import BestModel, EpochSums, Loop
from trainer.runtime.models import load_classifier, save_classifier
from trainer.runtime.predict import accuracy

def splits(cfg):
    """(labeled + pseudo-labeled, unlabeled without the pseudo-labeled images)."""
    train = labeled_with_pseudo_labels(cfg.data.root, cfg.fixmatch.labeled, cfg.fixmatch.pseudo_labels)
    return train, without(read_split(cfg.data.root, "unlabeled"), train.paths)


def train_step(ddp, labeled, unlabeled, pseudo_labeler, optimizer, scaler, precision, cfg, device, step):
    """One forward over [labeled, weak, strong], so BatchNorm normalises with the whole batch's statistics;
    (the loss parts, whether the weights were updated: not for a skipped step, train.on_nan=skip)."""
    views = [labeled["views"][0], *unlabeled["views"]]
    sizes = [len(v) for v in views]
    x = torch.cat([v.to(device, non_blocking=True) for v in views])
    with engine.autocast(precision, device):
        logits_l, logits_w, logits_s = ddp(x).split(sizes)
    out = fixmatch_loss(logits_l, labeled["label"].to(device), logits_w, logits_s, cfg.fixmatch.threshold,
                        cfg.fixmatch.lambda_u, pseudo_labeler=pseudo_labeler, index=unlabeled["index"].to(device))
    return out, engine.step_optimizer(out.total, optimizer, scaler, step, cfg.train.on_nan)


def main(argv=None):
    cfg = engine.parse(FixmatchConfig, argv, "FixMatch with an EMA of the weights")
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
    ema = EMA(model, cfg.fixmatch.ema)
    pseudo_labeler = make_pseudo_labeler(cfg.fixmatch.variant, num_classes, cfg.fixmatch.threshold,
                                         num_unlabeled=len(unlabeled.paths),
                                         distribution_alignment=cfg.fixmatch.distribution_alignment, runtime=rt)
    optimizer = optim.classifier_sgd(model, cfg.sgd.lr_backbone, cfg.sgd.lr_head, cfg.sgd.weight_decay,
                                     cfg.sgd.momentum, cfg.sgd.nesterov)
    size = cfg.data.image_size
    precision, measured = engine.resolve_precision(cfg.train.precision, model, ((B + 2 * U) // rt.world, 3, size, size), rt)
    scaler = engine.grad_scaler(precision, rt.device)
    run = engine.Run("fixmatch", cfg, rt)   # every check has passed: the first write
    total, warmup = schedule.plan(cfg.train.epochs, cfg.train.max_steps, cfg.sgd.warmup_epochs,
                                  unlabeled_loader.steps_per_epoch)
    best, sums = BestModel(), EpochSums(EPOCH_SUMS, rt.device)
    loop = Loop(run, unlabeled_loader, optimizer, {"model": model, "optimizer": optimizer, "scaler": scaler,
                                                   "ema": ema, "best": best, "epoch_sums": sums,
                                                   "pseudo_labeler": pseudo_labeler},
                total=total, warmup=warmup, images_per_step=B + 2 * U, final_lr_factor=0.0)
    resumed = loop.resume()
    ddp = dist.wrap_ddp(model, rt)   # after resume: DDP starts every rank from rank 0's weights
    run.say(f"{len(train.paths)} labeled images ({train.name}), {len(unlabeled.paths)} unlabeled, {rt.world} "
            f"rank(s), batch {B} + {cfg.fixmatch.mu}x{B} unlabeled, {unlabeled_loader.steps_per_epoch} steps/epoch, "
            f"{total} steps, backend {resolve_backend(cfg.data.backend)}, {cfg.fixmatch.variant}"
            f"{' + distribution alignment' if cfg.fixmatch.distribution_alignment else ''}, from {cfg.fixmatch.model}, "
            f"{engine.describe_precision(precision, measured)}")
    if not resumed:   # the starting model competes too: an epoch must beat it on val to replace it
        val = accuracy(model, val_loader, rt, precision)
        run.log(epoch=0, step=0, val_top1=val["top1"], val_top5=val["top5"])
        run.say(f"val top-1 at initialisation: {val['top1']:.4f}")
        best.offer(val["top1"], 0, ema.model, "start")
    labeled_batches = labeled_loader.stream(loop.step)   # the labeled epochs run alongside

    def fixmatch_step(batch, step) -> dict:
        out, updated = train_step(ddp, next(labeled_batches), batch, pseudo_labeler, optimizer, scaler, precision,
                                  cfg, rt.device, step)
        ema.update(model)
        if updated:
            sums.add(step_sums(out, None if hidden is None else hidden[batch["index"].to(rt.device)]))
        return {"loss": out.total, "loss_s": out.supervised, "loss_u": out.unsupervised, "mask_rate": out.mask.mean()}

    def evaluate(epoch, step, img_s) -> dict:
        event = {**epoch_summary(sums.mean_over_ranks(), hidden is not None), "img_s": round(img_s, 1)}
        if epoch % cfg.fixmatch.eval_every and step < total:
            return event
        raw = accuracy(model, val_loader, rt, precision)
        if cfg.fixmatch.bn_batches:
            batchnorm.recalibrate(ema.model, bn_loader, cfg.fixmatch.bn_batches, rt.device)
        averaged = accuracy(ema.model, val_loader, rt, precision)
        # the EMA weights usually score higher, but not always: val chooses (a tie keeps the EMA)
        best.offer(averaged["top1"], epoch, ema.model, "EMA")
        best.offer(raw["top1"], epoch, model, "live")
        run.say(f"epoch {epoch}: val top-1 {raw['top1']:.4f}, EMA {averaged['top1']:.4f}; mask rate "
                f"{event['mask_rate']:.3f}, pseudo-label accuracy {event.get('pseudo_acc')}, {img_s:.0f} img/s")
        return {**event, "val_top1": raw["top1"], "val_top1_ema": averaged["top1"], "val_top5_ema": averaged["top5"]}

    loop.run_epochs(fixmatch_step, evaluate)

    ema.model.load_state_dict(best.weights)
    run.log(event="done", best_epoch=best.epoch, best_weights=best.source, val_top1=best.top1)   # before model.pt: see pipeline
    if rt.is_main:
        save_classifier(ema.model, arch, run.path("model.pt"))
    dist.barrier()   # in-process callers read model.pt on every rank next
    which = f"epoch {best.epoch}, {best.source} weights" if best.epoch else "the starting model (no epoch beat it)"
    run.say(f"best val top-1 {best.top1:.4f}: {which}; wrote {run.path('model.pt')}")


if __name__ == "__main__":
    engine.cli(main)
