"""FixMatch: cross-entropy on labeled (+ pseudo-labeled) images plus, for each unlabeled image, the
confident prediction on a weak view as the target of a strong view; the weights' EMA is kept.

    python launch/fixmatch.py --config configs/demo/fixmatch.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/fixmatch.py --config configs/paper/fixmatch.yaml

fixmatch.variant names the algorithm, FixMatch or one of its variants (trainer/algorithms/fixmatch.py), or
any algorithm registered by name (trainer/algorithms/semi_supervised.py): this recipe builds the data, the
model and the optimizer, and runs the algorithm's step. An epoch is one pass over the unlabeled images
(fixmatch.mu x train.batch_size per step); the labeled loader cycles through its own epochs alongside.
Writes run.dir/model.pt: of the starting model and each evaluation's EMA and live weights, those best on
val, and run.dir/kept.json: whether the starting model was kept because nothing the run produced beat it
(trainer/runtime/keep.py). With fixmatch.bn_batches > 0 the EMA is evaluated (and saved) with BatchNorm
statistics of its own weights.
"""

import torch

from data.datasets import labeled_with_pseudo_labels, read_classes, read_split, without
from data.loaders import resolve_backend
from trainer.algorithms import semi_supervised
from trainer import dist
from trainer.runtime import amp, batch, engine, keep, optim, schedule
from trainer.runtime.stages import STAGES
from trainer.runtime.loading import eval_loader, loader
from trainer.runtime.loop import BestModel, Loop
from trainer.runtime.models import build_classifier, classifier_arch, load_classifier, save_classifier
from trainer.runtime.predict import accuracy


def batch_limits(cfg, train, unlabeled, note: str = "") -> list[tuple[int, str]]:
    """The labeled batch's limits: its labeled images (when known), and the unlabeled images mu batches draw on."""
    mu = cfg.fixmatch.mu
    limits = [(len(unlabeled) // mu, f"fixmatch.mu={mu} times the batch is drawn from the {len(unlabeled)} "
                                     "unlabeled images")]
    if train is not None:
        limits.append((len(train), f"a batch is drawn from the {len(train)} labeled images ({train.name}){note}"))
    return limits


def check(cfg):
    """The batches against the images written so far, before any work (the pipeline runs it before every
    stage). A labeled CSV not written yet leaves the unlabeled images whole, an upper bound."""
    train, note = batch.written_training_split(cfg.data.root, cfg.fixmatch.labeled, cfg.fixmatch.pseudo_labels)
    unlabeled = read_split(cfg.data.root, "unlabeled")
    batch.fit(cfg, batch_limits(cfg, train, unlabeled if train is None else without(unlabeled, train.paths), note))


def main(argv=None):
    cfg, rt = STAGES["fixmatch"].start(argv)

    classes = read_classes(cfg.data.root)
    train = labeled_with_pseudo_labels(cfg.data.root, cfg.fixmatch.labeled, cfg.fixmatch.pseudo_labels)
    unlabeled = without(read_split(cfg.data.root, "unlabeled"), train.paths)   # pseudo-labeled: trained as labeled
    B, lowered = batch.fit(cfg, batch_limits(cfg, train, unlabeled), rt.world)
    U = cfg.fixmatch.mu * B
    labeled_loader = loader(train, "weak", cfg, rt, global_batch=B)   # FixMatch: ℓs on weak views
    # Another seed for the unlabeled loader: its augmentations are not drawn in step with the labeled ones.
    unlabeled_loader = loader(unlabeled, "weak_strong", cfg, rt, global_batch=U, seed=cfg.run.seed + 1)
    val_loader = eval_loader(read_split(cfg.data.root, "val"), cfg, rt, U)
    bn_loader = (loader(unlabeled, "eval", cfg, rt, global_batch=U, seed=cfg.run.seed + 2)
                 if cfg.fixmatch.bn_batches else None)
    hidden = None if unlabeled.hidden_labels is None else torch.as_tensor(unlabeled.hidden_labels).to(rt.device)

    if cfg.fixmatch.model == "random":   # a baseline's start (pipeline.baselines): section model's network
        arch = classifier_arch(cfg.model, len(classes))
        model = build_classifier(arch)
    else:
        model, arch = load_classifier(cfg.fixmatch.model, cfg.data.root)
    model = rt.place(dist.sync_batchnorm(model))
    optimizer = optim.classifier_sgd(model, cfg.sgd.lr_backbone, cfg.sgd.lr_head, cfg.sgd.weight_decay,
                                     cfg.sgd.momentum, cfg.sgd.nesterov)
    rank_batch = ((B + 2 * U) // rt.world, 3, cfg.data.image_size, cfg.data.image_size)   # [labeled, weak, strong]
    precision, measured = amp.resolve_precision(cfg.train.precision, model, rank_batch, rt)
    scaler = amp.grad_scaler(precision, rt.device)
    algorithm = semi_supervised.ALGORITHMS[cfg.fixmatch.variant](semi_supervised.Setup(
        cfg, rt, model, optimizer, scaler, precision, len(classes), len(unlabeled.paths), hidden))
    run = engine.Run("fixmatch", cfg, rt, lowered)   # every check has passed: the first write
    total, warmup = schedule.plan(cfg.train, cfg.sgd.warmup_epochs, unlabeled_loader.steps_per_epoch)
    best = BestModel()
    loop = Loop(run, unlabeled_loader, optimizer, {"model": model, "optimizer": optimizer, "scaler": scaler,
                                                   "best": best, **algorithm.state},
                total=total, warmup=warmup, images_per_step=B + 2 * U, final_lr_factor=0.0)
    resumed = loop.resume()
    ddp = dist.wrap_ddp(model, rt)   # after resume: DDP starts every rank from rank 0's weights
    run.say(f"{len(train.paths)} labeled images ({train.name}), {len(unlabeled.paths)} unlabeled, {rt.world} "
            f"rank(s), batch {B} + {cfg.fixmatch.mu}x{B} unlabeled, {unlabeled_loader.steps_per_epoch} steps/epoch, "
            f"{loop.total} steps, backend {resolve_backend(cfg.data.backend)}, {cfg.fixmatch.variant}"
            f"{' + distribution alignment' if cfg.fixmatch.distribution_alignment else ''}, from {cfg.fixmatch.model}, "
            f"{amp.describe_precision(precision, measured)}")
    if not resumed:   # the starting model competes too: an epoch must beat it on val to replace it
        val = accuracy(model, val_loader, rt, precision)
        run.log(epoch=0, step=0, val_top1=val["top1"], val_top5=val["top5"])
        run.say(f"val top-1 at initialisation: {val['top1']:.4f}")
        best.offer_input(val["top1"], model)
    labeled_batches = labeled_loader.stream(loop.step)   # the labeled epochs run alongside

    def evaluate(epoch, step, img_s) -> dict:
        event = {**algorithm.summarise_epoch(), "img_s": round(img_s, 1)}
        if epoch % cfg.fixmatch.eval_every and step < loop.total:
            return event
        val = algorithm.validate(val_loader, bn_loader, best, epoch)
        run.say(f"epoch {epoch}: val top-1 {val['val_top1']:.4f}, EMA {val['val_top1_ema']:.4f}; mask rate "
                f"{event['mask_rate']:.3f}, pseudo-label accuracy {event.get('pseudo_acc')}, {img_s:.0f} img/s")
        return {**event, **val}

    loop.run_epochs(lambda batch, step: algorithm.train_step(ddp, next(labeled_batches), batch, step), evaluate)

    model.load_state_dict(best.weights)
    run.log(event="done", best_epoch=best.epoch, best_weights=best.source, val_top1=best.top1)   # before model.pt: see pipeline
    kept = keep.write(run, cfg.fixmatch.model, best.input_top1, best.own_top1,
                      f"epoch {best.own_epoch}, {best.own_source} weights")
    if rt.is_main:
        save_classifier(model, arch, classes, run.path("model.pt"))
    dist.barrier()   # in-process callers read model.pt on every rank next
    which = (f"epoch {best.epoch}, {best.source} weights" if best.source != BestModel.INPUT else
             f"the starting model (no epoch beat it), {keep.note(kept)} ({kept['own_best']})")
    run.say(f"best val top-1 {best.top1:.4f}: {which}; wrote {run.path('model.pt')}")


if __name__ == "__main__":
    engine.cli(main)
