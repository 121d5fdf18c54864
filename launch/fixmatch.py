"""FixMatch: cross-entropy on labeled (+ pseudo-labeled) images plus, for each unlabeled image, the
confident prediction on a weak view as the target of a strong view; the weights' EMA is kept.

    python launch/fixmatch.py --config configs/demo/fixmatch.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/fixmatch.py --config configs/paper/fixmatch.yaml

An epoch is one pass over the unlabeled images (fixmatch.mu x train.batch_size per step); the labeled
loader cycles through its own epochs alongside. Writes run.dir/model.pt: the EMA weights of the
epoch with the best EMA val top-1, or the starting model when no epoch beats it on val. With
fixmatch.bn_batches > 0 the EMA is evaluated (and saved) with BatchNorm statistics of its own weights.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import copy  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data.datasets import labeled_with_pseudo_labels, read_classes, read_split  # noqa: E402
from data.loaders import resolve_backend  # noqa: E402
from trainer import dist, engine, optim, schedule  # noqa: E402
from trainer.config import FixmatchConfig  # noqa: E402
from trainer.ema import EMA  # noqa: E402
from trainer.fixmatch import fixmatch_loss  # noqa: E402
from trainer.loading import eval_loader, loader  # noqa: E402
from trainer.models import load_classifier, save_classifier  # noqa: E402
from trainer.predict import accuracy  # noqa: E402

# Per-epoch sums, kept on the device so no step waits for the host; saved in checkpoints so a
# resumed epoch reports the same figures as an uninterrupted one.
STATS = ("loss", "loss_s", "loss_u", "steps", "unlabeled", "masked", "pseudo_hits", "masked_pseudo_hits")


def splits(cfg):
    """(labeled + pseudo-labeled, unlabeled without the pseudo-labeled images)."""
    train = labeled_with_pseudo_labels(cfg.data.root, cfg.fixmatch.labeled, cfg.fixmatch.pseudo_labels)
    unlabeled = read_split(cfg.data.root, "unlabeled")
    taken = set(train.paths)
    keep = np.array([p not in taken for p in unlabeled.paths], dtype=bool)
    if not keep.all():
        hidden = None if unlabeled.hidden_labels is None else unlabeled.hidden_labels[keep]
        unlabeled = dataclasses.replace(unlabeled, paths=[p for p, k in zip(unlabeled.paths, keep) if k],
                                        hidden_labels=hidden)
    return train, unlabeled


def train_step(ddp, labeled, unlabeled, hidden_labels, optimizer, scaler, cfg, device, step):
    """One forward over [labeled, weak, strong], so BatchNorm normalises with the whole batch's statistics.
    The statistics row is zero for a skipped step (train.on_nan=skip)."""
    views = [labeled["views"][0], *unlabeled["views"]]
    sizes = [len(v) for v in views]
    x = torch.cat([v.to(device, non_blocking=True) for v in views])
    with engine.autocast(cfg.train.precision, device):
        logits_l, logits_w, logits_s = ddp(x).split(sizes)
    out = fixmatch_loss(logits_l, labeled["label"].to(device), logits_w, logits_s,
                        cfg.fixmatch.threshold, cfg.fixmatch.lambda_u)
    updated = engine.step_optimizer(out.total, optimizer, scaler, step, cfg.train.on_nan)
    with torch.no_grad():
        if hidden_labels is None:   # real unlabeled data: nothing to measure pseudo-labels against
            hits = torch.zeros_like(out.mask)
        else:   # simulations only: hidden labels measure the pseudo-labels, never train
            hits = (out.pseudo_labels == hidden_labels[unlabeled["index"].to(device)]).double()
        mask = out.mask.double()
        row = torch.stack([out.total.detach().double(), out.supervised.detach().double(),
                           out.unsupervised.detach().double(), torch.ones_like(mask[0]),
                           torch.full_like(mask[0], len(mask)), mask.sum(), hits.sum(), (hits * mask).sum()])
    return out, row if updated else torch.zeros_like(row)


def recalibrate_bn(model, loader, batches, device):
    """Running statistics of `model`'s own weights, averaged over `batches` batches (torch's SWA helper).

    The EMA copies the live model's buffers, which belong to other weights and to a batch that is
    mostly strong views; evaluation sees clean images.
    """
    images = (batch["views"][0] for batch in itertools.islice(loader.epoch(0), batches))
    torch.optim.swa_utils.update_bn(images, model, device)


def summarise(sums: torch.Tensor, has_hidden: bool) -> dict:
    """Means over the epoch and over ranks (every rank has the same number of steps and images)."""
    s = dict(zip(STATS, dist.all_reduce_mean_(sums.clone()).tolist()))
    steps = max(s["steps"], 1)
    out = {"loss": s["loss"] / steps, "loss_s": s["loss_s"] / steps, "loss_u": s["loss_u"] / steps,
           "mask_rate": s["masked"] / max(s["unlabeled"], 1)}
    if has_hidden:
        out["pseudo_acc"] = s["pseudo_hits"] / max(s["unlabeled"], 1)
        out["pseudo_acc_masked"] = s["masked_pseudo_hits"] / s["masked"] if s["masked"] else None
    return out


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

    model, arch = load_classifier(cfg.fixmatch.init)
    if arch["num_classes"] != num_classes:
        raise engine.StageError(f"fixmatch.init={cfg.fixmatch.init}: a model for {arch['num_classes']} classes, "
                                f"but {cfg.data.root}/classes.txt has {num_classes}")
    model = rt.place(dist.sync_batchnorm(model))
    ema = EMA(model, cfg.fixmatch.ema)
    optimizer = optim.classifier_sgd(model, cfg.optim.lr_backbone, cfg.optim.lr_head, cfg.optim.weight_decay,
                                     cfg.optim.momentum, cfg.optim.nesterov)
    scaler = engine.grad_scaler(cfg.train.precision, rt.device)
    run = engine.Run("fixmatch", cfg, rt)   # every check has passed: the first write
    state = run.resume(model, optimizer, scaler)
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    best = {"top1": state.get("best_top1", -1.0), "epoch": state.get("best_epoch", -1),
            "model": state.get("best_model")}
    sums = state.get("epoch_stats", torch.zeros(len(STATS), dtype=torch.float64)).to(rt.device)
    ddp = dist.wrap_ddp(model, rt)

    steps_per_epoch = unlabeled_loader.steps_per_epoch
    total, warmup = schedule.plan(cfg.train.epochs, cfg.train.max_steps, cfg.optim.warmup_epochs, steps_per_epoch)
    images_per_step = B + 2 * U
    run.say(f"{len(train.paths)} labeled images ({train.name}), {len(unlabeled.paths)} unlabeled, {rt.world} "
            f"rank(s), batch {B} + {cfg.fixmatch.mu}x{B} unlabeled, {steps_per_epoch} steps/epoch, {total} steps, "
            f"backend {resolve_backend(cfg.data.backend)}, init {cfg.fixmatch.init}")
    step, epoch, start = state["step"], state["epoch"], state["step_in_epoch"]
    if step == 0:
        val = accuracy(model, val_loader, rt, cfg.train.precision)
        run.log(epoch=0, step=0, val_top1=val["top1"], val_top5=val["top5"])
        run.say(f"val top-1 at initialisation: {val['top1']:.4f}")
        # the starting model competes too: an epoch must beat it on val to replace it
        best = {"top1": val["top1"], "epoch": 0, "model": copy.deepcopy(ema.model.state_dict())}

    def save(step, epoch, step_in_epoch):
        run.save_checkpoint(model, optimizer, scaler, step, epoch, step_in_epoch, ema=ema.state_dict(),
                            epoch_stats=sums.cpu(), best_top1=best["top1"], best_epoch=best["epoch"],
                            best_model=best["model"])

    labeled_batches = labeled_loader.stream(step)   # the labeled epochs run alongside, where a resumed run left off
    bar = run.progress(total, step)
    while step < total:
        t0, done = time.time(), 0
        for i, batch in enumerate(unlabeled_loader.epoch(epoch, start), start=start):
            schedule.apply_lr(optimizer, schedule.lr_factor(step, total, warmup, final_factor=0.0))
            out, row = train_step(ddp, next(labeled_batches), batch, hidden, optimizer, scaler, cfg, rt.device,
                                  step)
            ema.update(model)
            sums += row
            step, done = step + 1, done + 1
            bar.update()
            if step % cfg.run.log_every == 0 or step == total:
                parts = torch.stack([out.total.detach(), out.supervised.detach(), out.unsupervised.detach(),
                                     out.mask.mean()]).float()
                loss, loss_s, loss_u, mask = dist.all_reduce_mean_(parts).tolist()
                img_s = done * images_per_step / (time.time() - t0)
                bar.set_postfix(loss=f"{loss:.3f}", mask=f"{mask:.2f}", img_s=f"{img_s:.0f}")
                run.log(epoch=epoch, step=step, loss=loss, loss_s=loss_s, loss_u=loss_u, mask_rate=mask,
                        lr=optimizer.param_groups[0]["lr"], img_s=round(img_s, 1))
            if step == total:
                break
            if step % cfg.run.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                save(step, epoch, i + 1)
        img_s = done * images_per_step / (time.time() - t0)
        epoch, start = epoch + 1, 0
        event = {"epoch": epoch, "step": step, **summarise(sums, hidden is not None), "img_s": round(img_s, 1)}
        sums.zero_()
        if epoch % cfg.fixmatch.eval_every == 0 or step == total:
            raw = accuracy(model, val_loader, rt, cfg.train.precision)
            if cfg.fixmatch.bn_batches:
                recalibrate_bn(ema.model, bn_loader, cfg.fixmatch.bn_batches, rt.device)
            averaged = accuracy(ema.model, val_loader, rt, cfg.train.precision)
            event.update(val_top1=raw["top1"], val_top1_ema=averaged["top1"], val_top5_ema=averaged["top5"])
            if averaged["top1"] > best["top1"]:
                best = {"top1": averaged["top1"], "epoch": epoch, "model": copy.deepcopy(ema.model.state_dict())}
            run.say(f"epoch {epoch}: val top-1 {raw['top1']:.4f}, EMA {averaged['top1']:.4f}; mask rate "
                    f"{event['mask_rate']:.3f}, pseudo-label accuracy {event.get('pseudo_acc')}, {img_s:.0f} img/s")
        run.log(**event)
        save(step, epoch, 0)
    bar.close()

    ema.model.load_state_dict(best["model"])
    run.log(event="done", best_epoch=best["epoch"], val_top1=best["top1"])   # before model.pt: see pipeline
    if rt.is_main:
        save_classifier(ema.model, arch, run.path("model.pt"))
    dist.barrier()   # in-process callers read model.pt on every rank next
    which = f"epoch {best['epoch']}" if best["epoch"] else "the starting model (no epoch beat it)"
    run.say(f"best EMA val top-1 {best['top1']:.4f}: {which}; wrote {run.path('model.pt')}")


if __name__ == "__main__":
    engine.cli(main)
