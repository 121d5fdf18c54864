"""Self-supervised pretraining -> run.dir/backbone.pt. pretrain.method names the method
(trainer/algorithms/self_supervised.py): barlow_twins, the default.

    python launch/pretrain.py --config configs/demo/pretrain.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/paper/pretrain.yaml
"""

import dataclasses


from data.datasets import read_classes, read_split
from data.loaders import resolve_backend
from data.views import views_of
from trainer import dist
from trainer.runtime import amp, batch, checkpoint, engine, optim, schedule
from trainer.runtime.config import ConfigError
from trainer.algorithms import knn, self_supervised
from trainer.runtime.loop import Loop
from trainer.runtime.loading import eval_loader, loader
from trainer.runtime.stages import STAGES
from trainer.runtime.models import BACKBONE_ARCH, backbone_arch, build_backbone
from trainer.runtime.predict import embed


def knn_monitor(backbone, cfg, rt, labeled, val, precision) -> float:
    """Top-1 of a cosine kNN classifier: labeled embeddings vote for each val image.

    Every rank embeds its shard; rank 0 alone searches (one faiss index, on its own GPU) and tells the others.
    """
    def features(split):
        return embed(backbone, eval_loader(split, cfg, rt, cfg.train.batch_size), rt, len(split.paths), precision)
    references, queries = features(labeled), features(val)
    return dist.rank0_decides(lambda: knn.knn_accuracy(
        references, labeled.labels, queries, val.labels, num_classes=len(read_classes(cfg.data.root)), k=cfg.knn.k,
        temperature=cfg.knn.temperature, gpu=knn.faiss_gpu(rt.device)))


def train_step(model, views, optimizer, scaler, precision, device, step=0, on_nan="stop"):
    views = [v.to(device, non_blocking=True) for v in views]
    with amp.autocast(precision, device):
        loss = model(*views)
    amp.step_optimizer(loss, optimizer, scaler, step, on_nan)
    return loss


def batch_limits(images: int) -> list[tuple[int, str]]:
    return [(images, f"a batch is drawn from the {images} labeled + unlabeled images")]


def check(cfg):
    """The batch against the images, and the kNN monitor's k against the labeled images that vote, before
    any work (the pipeline runs it before every stage)."""
    labeled, unlabeled = read_split(cfg.data.root, "labeled"), read_split(cfg.data.root, "unlabeled")
    batch.fit(cfg, batch_limits(len(labeled) + len(unlabeled)))
    if cfg.knn.every_epochs and cfg.knn.k > len(labeled):
        raise ConfigError(f"knn.k={cfg.knn.k}: expected 1..{len(labeled)} (the labeled images, which vote in the "
                          "kNN monitor; knn.every_epochs=0 turns it off)")


def main(argv=None):
    cfg, rt = STAGES["pretrain"].start(argv)

    # data: every image without a label plus the labeled ones (their labels are not used here)
    labeled, val = read_split(cfg.data.root, "labeled"), read_split(cfg.data.root, "val")
    unlabeled = read_split(cfg.data.root, "unlabeled")
    images = dataclasses.replace(unlabeled, name="pretrain", paths=unlabeled.paths + labeled.paths,
                                 labels=None, hidden_labels=None)
    B, lowered = batch.fit(cfg, batch_limits(len(images.paths)), rt.world)
    method = self_supervised.METHODS[cfg.pretrain.method]
    train_loader = loader(images, method.views, cfg, rt, global_batch=B)

    # model: the method's network around the backbone; N ranks see one global batch (synchronised BatchNorm)
    backbone = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width)
    model = method.build(backbone, cfg, B)
    model = rt.place(dist.sync_batchnorm(model))
    scale = B / 256   # learning rates are given per 256 images
    optimizer = optim.build_optimizer(
        "apex_lars" if cfg.lars.impl == "apex" else "lars", model,
        lr_weights=cfg.lars.lr_weights * scale, lr_biases=cfg.lars.lr_biases * scale,
        weight_decay=cfg.lars.weight_decay)
    size = cfg.data.image_size   # the backbone's step stands for the model's: the projector is small beside it
    views = len(views_of(method.views, size))
    precision, measured = amp.resolve_precision(cfg.train.precision, backbone,
                                                (views * B // rt.world, 3, size, size), rt)
    scaler = amp.grad_scaler(precision, rt.device)
    run = engine.Run("pretrain", cfg, rt, lowered)   # every check has passed: the first write
    total, warmup = schedule.plan(cfg.train, cfg.lars.warmup_epochs, train_loader.steps_per_epoch)
    loop = Loop(run, train_loader, optimizer, {"model": model, "optimizer": optimizer, "scaler": scaler},
                total=total, warmup=warmup, images_per_step=B)
    resumed = loop.resume()
    ddp = dist.wrap_ddp(model, rt)   # after resume: DDP starts every rank from rank 0's weights
    run.say(f"{len(images.paths)} images, {rt.world} rank(s), global batch {B}, "
            f"{train_loader.steps_per_epoch} steps/epoch, {loop.total} steps, "
            f"backend {resolve_backend(cfg.data.backend)}, {cfg.pretrain.method}, {amp.describe_precision(precision, measured)}")

    def knn_every(epoch, step, img_s) -> dict:
        if not cfg.knn.every_epochs or (epoch % cfg.knn.every_epochs and step < loop.total):
            return {}
        top1 = knn_monitor(backbone, cfg, rt, labeled, val, precision)
        run.say(f"epoch {epoch}: kNN top-1 {top1:.4f}")
        return {"knn_top1": top1}

    if not resumed and cfg.knn.every_epochs:   # kNN at initialisation: the baseline training must beat
        run.log(epoch=0, step=0, **knn_every(0, 0, 0.0))
    loop.run_epochs(lambda batch, step: {"loss": train_step(ddp, batch["views"], optimizer, scaler,
                                                            precision, rt.device, step, cfg.train.on_nan)},
                    knn_every)

    if rt.is_main:   # a plain state_dict: loads into the torchvision model it came from
        engine.write_json(run.path(BACKBONE_ARCH), backbone_arch(cfg.model))   # before backbone.pt: see pipeline
        checkpoint.save_atomic(backbone.state_dict(), run.path("backbone.pt"))
    dist.barrier()   # in-process callers read backbone.pt on every rank next
    run.say(f"wrote {run.path('backbone.pt')}")


if __name__ == "__main__":
    engine.cli(main)
