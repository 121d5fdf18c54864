"""Fine-tune a pretrained backbone + a fresh linear head on labeled (+ pseudo-labeled) images.

    python launch/finetune.py --config configs/demo/finetune.yaml [key=value ...]

Writes run.dir/model.pt: the weights of the epoch with the best val top-1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import copy  # noqa: E402
import time  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from data.datasets import labeled_with_pseudo_labels, read_classes, read_split  # noqa: E402
from trainer import dist, engine, optim, schedule  # noqa: E402
from trainer.loading import eval_loader, loader  # noqa: E402
from trainer.config import FinetuneConfig  # noqa: E402
from trainer.models import Classifier, build_backbone, classifier_arch, load_backbone_weights, save_classifier  # noqa: E402
from trainer.predict import accuracy  # noqa: E402


def main(argv=None):
    cfg = engine.parse(FinetuneConfig, argv, "Fine-tune backbone + linear head")
    rt = dist.init(cfg.run.device)
    engine.check_dataset(cfg, rt, cfg.finetune.labeled)
    engine.seed_everything(cfg.run.seed)

    num_classes = len(read_classes(cfg.data.root))
    train = labeled_with_pseudo_labels(cfg.data.root, cfg.finetune.labeled, cfg.finetune.pseudo_labels)
    B = cfg.train.batch_size
    if B % rt.world or B > len(train.paths):
        raise engine.StageError(f"train.batch_size={B}: must divide by {rt.world} rank(s) and be at most "
                                f"the {len(train.paths)} training images")
    train_loader = loader(train, cfg.finetune.augment, cfg, rt, global_batch=B)
    val_loader = eval_loader(read_split(cfg.data.root, "val"), cfg, rt, B)

    backbone = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width)
    if cfg.finetune.init:   # "" trains from scratch: the supervised-only baseline
        load_backbone_weights(backbone, cfg.finetune.init)
    model = rt.place(dist.sync_batchnorm(Classifier(backbone, num_classes)))
    optimizer = optim.classifier_sgd(model, cfg.optim.lr_backbone, cfg.optim.lr_head,
                                     cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.nesterov)
    scaler = engine.grad_scaler(cfg.train.precision, rt.device)
    run = engine.Run("finetune", cfg, rt)   # every check has passed: the first write
    state = run.resume(model, optimizer, scaler)
    best = {"top1": state.get("best_top1", -1.0), "epoch": state.get("best_epoch", -1),
            "model": state.get("best_model")}
    ddp = dist.wrap_ddp(model, rt)

    total, warmup = schedule.plan(cfg.train.epochs, cfg.train.max_steps, cfg.optim.warmup_epochs,
                                  train_loader.steps_per_epoch)
    run.say(f"{len(train.paths)} training images ({train.name}), {num_classes} classes, init "
            f"{cfg.finetune.init or 'random'}, {train_loader.steps_per_epoch} steps/epoch, {total} steps")
    step, epoch, start = state["step"], state["epoch"], state["step_in_epoch"]
    bar = run.progress(total, step)
    while step < total:
        t0, seen = time.time(), 0
        for i, batch in enumerate(train_loader.epoch(epoch, start), start=start):
            schedule.apply_lr(optimizer, schedule.lr_factor(step, total, warmup, final_factor=0.0))
            x, y = batch["views"][0].to(rt.device, non_blocking=True), batch["label"].to(rt.device)
            with engine.autocast(cfg.train.precision, rt.device):
                loss = F.cross_entropy(ddp(x).float(), y)
            engine.step_optimizer(loss, optimizer, scaler, step, cfg.train.on_nan)
            step, seen = step + 1, seen + B
            bar.update()
            if step % cfg.run.log_every == 0 or step == total:
                loss_value = dist.all_reduce_mean_(loss.detach().float()).item()
                bar.set_postfix(loss=f"{loss_value:.3f}")
                run.log(epoch=epoch, step=step, loss=loss_value, lr=optimizer.param_groups[0]["lr"],
                        img_s=round(seen / (time.time() - t0), 1))
            if step == total:
                break
            if step % cfg.run.checkpoint_every == 0 and i + 1 < train_loader.steps_per_epoch:
                run.save_checkpoint(model, optimizer, scaler, step, epoch, i + 1, best_top1=best["top1"],
                                    best_epoch=best["epoch"], best_model=best["model"])
        epoch, start = epoch + 1, 0
        if epoch % cfg.finetune.eval_every == 0 or step == total:
            val = accuracy(model, val_loader, rt, cfg.train.precision)
            run.log(epoch=epoch, step=step, val_top1=val["top1"], val_top5=val["top5"])
            if val["top1"] > best["top1"]:
                best = {"top1": val["top1"], "epoch": epoch, "model": copy.deepcopy(model.state_dict())}
        run.save_checkpoint(model, optimizer, scaler, step, epoch, 0, best_top1=best["top1"],
                            best_epoch=best["epoch"], best_model=best["model"])
    bar.close()

    model.load_state_dict(best["model"])
    run.log(event="done", best_epoch=best["epoch"], val_top1=best["top1"])   # before model.pt: see pipeline
    if rt.is_main:
        save_classifier(model, classifier_arch(cfg.model, num_classes), run.path("model.pt"))
    dist.barrier()   # in-process callers (pseudolabel) read model.pt on every rank next
    run.say(f"best val top-1 {best['top1']:.4f} at epoch {best['epoch']}; wrote {run.path('model.pt')}")


if __name__ == "__main__":
    engine.cli(main)
