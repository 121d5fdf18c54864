"""Fine-tune a pretrained backbone + a fresh linear head on labeled (+ pseudo-labeled) images.

    python launch/finetune.py --config configs/demo/finetune.yaml [key=value ...]

Writes run.dir/model.pt: the weights of the epoch with the best val top-1.
"""

import torch.nn.functional as F

from data.datasets import labeled_with_pseudo_labels, read_classes, read_split
from trainer import dist
from trainer.runtime import amp, batch, engine, optim, schedule
from trainer.runtime.loading import eval_loader, loader
from trainer.runtime.stages import STAGES
from trainer.runtime.loop import BestModel, Loop
from trainer.runtime.models import Classifier, build_backbone, classifier_arch, load_backbone_weights, save_classifier
from trainer.runtime.predict import accuracy


def batch_limits(train, note: str = "") -> list[tuple[int, str]]:
    return [(len(train), f"a batch is drawn from the {len(train)} training images ({train.name}){note}")]


def check(cfg):
    """train.batch_size against the training images written so far, before any work (the pipeline runs it
    before every stage; a pseudolabel run for each fine-tune of its iterations)."""
    train, note = batch.written_training_split(cfg.data.root, cfg.finetune.labeled, cfg.finetune.pseudo_labels)
    if train is not None:
        batch.fit(cfg, batch_limits(train, note))


def main(argv=None):
    cfg, rt = STAGES["finetune"].start(argv)

    classes = read_classes(cfg.data.root)
    num_classes = len(classes)
    train = labeled_with_pseudo_labels(cfg.data.root, cfg.finetune.labeled, cfg.finetune.pseudo_labels)
    B, lowered = batch.fit(cfg, batch_limits(train), rt.world)
    train_loader = loader(train, cfg.finetune.augment, cfg, rt, global_batch=B)
    val_loader = eval_loader(read_split(cfg.data.root, "val"), cfg, rt, B)

    backbone = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width)
    if cfg.finetune.backbone != "random":   # random: the supervised-only baseline
        load_backbone_weights(backbone, cfg.finetune.backbone)
    model = rt.place(dist.sync_batchnorm(Classifier(backbone, num_classes)))
    optimizer = optim.classifier_sgd(model, cfg.sgd.lr_backbone, cfg.sgd.lr_head,
                                     cfg.sgd.weight_decay, cfg.sgd.momentum, cfg.sgd.nesterov)
    size = cfg.data.image_size
    precision, measured = amp.resolve_precision(cfg.train.precision, model, (B // rt.world, 3, size, size), rt)
    scaler = amp.grad_scaler(precision, rt.device)
    run = engine.Run("finetune", cfg, rt, lowered)   # every check has passed: the first write
    total, warmup = schedule.plan(cfg.train, cfg.sgd.warmup_epochs, train_loader.steps_per_epoch)
    best = BestModel()
    loop = Loop(run, train_loader, optimizer, {"model": model, "optimizer": optimizer, "scaler": scaler,
                                               "best": best},
                total=total, warmup=warmup, images_per_step=B, final_lr_factor=0.0)
    loop.resume()
    ddp = dist.wrap_ddp(model, rt)   # after resume: DDP starts every rank from rank 0's weights
    run.say(f"{len(train.paths)} training images ({train.name}), {num_classes} classes, backbone "
            f"{cfg.finetune.backbone}, {train_loader.steps_per_epoch} steps/epoch, {loop.total} steps, "
            f"{amp.describe_precision(precision, measured)}")

    def train_step(batch, step) -> dict:
        x, y = batch["views"][0].to(rt.device, non_blocking=True), batch["label"].to(rt.device)
        with amp.autocast(precision, rt.device):
            loss = F.cross_entropy(ddp(x).float(), y)
        amp.step_optimizer(loss, optimizer, scaler, step, cfg.train.on_nan)
        return {"loss": loss}

    def evaluate(epoch, step, img_s) -> dict:
        if epoch % cfg.finetune.eval_every and step < loop.total:
            return {}
        val = accuracy(model, val_loader, rt, precision)
        best.offer(val["top1"], epoch, model)
        return {"val_top1": val["top1"], "val_top5": val["top5"]}

    loop.run_epochs(train_step, evaluate)

    model.load_state_dict(best.weights)
    run.log(event="done", best_epoch=best.epoch, val_top1=best.top1)   # before model.pt: see pipeline
    if rt.is_main:
        save_classifier(model, classifier_arch(cfg.model, num_classes), classes, run.path("model.pt"))
    dist.barrier()   # in-process callers (pseudolabel) read model.pt on every rank next
    run.say(f"best val top-1 {best.top1:.4f} at epoch {best.epoch}; wrote {run.path('model.pt')}")


if __name__ == "__main__":
    engine.cli(main)
