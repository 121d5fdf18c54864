"""Paper-shape throughput and memory against the hardware's limit, on the GPU when there is one.

Two training steps, each the stage's own step on its paper config (configs/paper/), under bf16 autocast with
channels-last weights, on one device without a process group (plain BatchNorm, no DDP: a stage on one GPU):
  barlow_twins  pretrain's step: ResNet-50 + 8192-8192-8192 projector, 96 px, two views, LARS, at the
                largest per-GPU batch that fits: tried from the paper's global batch down (batches_to_try),
                a batch that runs out of GPU memory giving way to the next smaller
  fixmatch      FixMatch's step: the fine-tuned ResNet-50 at 96 px, B labeled images and mu x B unlabeled
                ones in a weak and a strong view, Nesterov SGD and the EMA, at the paper's per-GPU batch
Per step: img/s (images per step as the stage's log counts them: pretrain's images, two views each;
FixMatch's labeled + weak + strong views), peak memory (weights and optimizer state included), FLOPs
(forward and backward, counted by torch.utils.flop_counter on one step) and model FLOPs utilisation:
achieved FLOP/s over the GPU's dense bf16 peak (PEAK_TFLOP_S; "unknown" for a GPU not listed, "n/a" on a
CPU). The batches are random tensors already on the device: the step alone, not the loader (the loader
suite times that). Beside them, an anchor that is not a measurement: the Barlow Twins paper's throughput
per V100, scaled by pixels to 96 px.

On a CPU, and with --quick, the same code runs at tiny shapes (a small net of width 8, 32 px, a
Barlow Twins batch of 8 with a 64-d projector, FixMatch B = 2): never a paper-shape figure from a CPU.
"""
import gc
import os
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from launch import pretrain
from trainer import dist
from trainer.algorithms import self_supervised, semi_supervised
from trainer.runtime import amp, config, optim
from trainer.runtime.config import FinetuneConfig, FixmatchConfig, PretrainConfig
from trainer.runtime.models import build_backbone, build_classifier, classifier_arch

PAPER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "configs", "paper")
PRECISION = "bf16"
GPUS_PER_NODE = 8      # the paper configs' global batches are spread over a node's 8 GPUs
PAPER_CLASSES = 800    # configs/paper/pipeline.yaml
BUDGET_S = 300         # bench.py's soft cap on the suite's timed steps (the GPU smoke gives it less)
WARMUP_STEPS = 2       # after the counted step, which already allocates and chooses the kernels
TIMED_STEPS, MIN_TIMED_STEPS = 20, 3   # fewer than 20 once the budget is spent, never fewer than 3

# Overrides of the paper configs that make the tiny shapes of a CPU or --quick run.
TINY = {"pretrain": ["model.backbone=small", "model.width=8", "barlow.projector=[64,64,64]", "data.image_size=32",
                     "train.batch_size=8"],
        "finetune": ["model.backbone=small", "model.width=8"],
        "fixmatch": ["data.image_size=32", f"train.batch_size={2 * GPUS_PER_NODE}"]}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from NVIDIA's data sheets, by the first key that
# torch.cuda.get_device_name contains: the specific names come before "H100", which is the SXM part
# ("NVIDIA H100 80GB HBM3").
PEAK_TFLOP_S = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200 NVL": 835, "H200": 989, "A100": 312,
                "V100": 125}   # V100: its fp16 peak (it has no bf16 units)

# The anchor: the Barlow Twins paper trains 1000 epochs of ImageNet's 1,281,167 images in about 124 hours
# on 32 V100s (its section 4), at 224 px; per GPU, and that figure scaled by pixels to 96 px.
ANCHOR_V100_224PX_IMG_S = 1_281_167 * 1000 / (124 * 3600) / 32
ANCHOR_V100_96PX_IMG_S = ANCHOR_V100_224PX_IMG_S * (224 / 96) ** 2


def peak_tflop_s(device: torch.device):
    """The device's dense bf16 peak: a number, "unknown" for a GPU not in PEAK_TFLOP_S, "n/a" on a CPU."""
    if device.type != "cuda":
        return "n/a"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOP_S.items() if key in name), "unknown")


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of `step` as torch.utils.flop_counter counts them: the matrix products and
    convolutions that run, forward and backward, 2 per multiply-add (normalisation, activations and the
    optimizer's elementwise updates are not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def batches_to_try(largest: int) -> list[int]:
    """largest, 3/4 of it, 1/2, 3/8, ... down to 2: the first that fits is within a third of the limit."""
    sizes, b = set(), largest
    while b >= 2:
        sizes |= {b, b * 3 // 4}
        b //= 2
    return sorted((s for s in sizes if s >= 2), reverse=True)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device):
    """Hand back the memory of a batch that is done with (or ran out of memory), so the next starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_step(step: Callable[[], object], images: int, device: torch.device, deadline: float, peak) -> dict:
    """Count one step's FLOPs (the first step, which allocates and chooses kernels), warm up, then time
    TIMED_STEPS (fewer past `deadline`, a perf_counter time) as one stretch between device syncs."""
    flops = step_flops(step)
    for _ in range(WARMUP_STEPS):
        step()
    _sync(device)
    steps, t0 = 0, time.perf_counter()
    while steps < TIMED_STEPS and (steps < MIN_TIMED_STEPS or time.perf_counter() < deadline):
        step()
        steps += 1
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    achieved = flops / seconds / 1e12
    return {"step_ms": 1000 * seconds, "img_s": images / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else "n/a",
            "flop_per_step": flops, "achieved_tflop_s": achieved,
            "mfu": achieved / peak if isinstance(peak, (int, float)) else peak}


def largest_that_fits(candidates: list[int], build: Callable[[int], tuple[Callable[[], object], int]],
                      device: torch.device, deadline: float, peak) -> dict:
    """The figures of the first batch of `candidates` whose step runs: build(batch) -> (the step, its
    images); a batch that runs out of GPU memory is noted and the next one tried."""
    out_of_memory = []
    for batch in candidates:
        _release(device)
        try:
            step, images = build(batch)
            figures = time_step(step, images, device, deadline, peak)
        except torch.cuda.OutOfMemoryError:
            out_of_memory.append(batch)
            step = None   # the batch's model and tensors go before the next is built
            continue
        return {"batch": batch, "images_per_step": images, **figures,
                "batches_out_of_memory": ", ".join(map(str, out_of_memory)) or "none"}
    raise RuntimeError(f"no batch of {candidates} fits on {device} (all ran out of memory)")


def barlow_twins(rt: dist.Runtime, tiny: bool) -> tuple[str, list[int], Callable]:
    """(what is timed, the batches to try, build) for pretrain's step on configs/paper/pretrain.yaml."""
    cfg = config.load(PretrainConfig, os.path.join(PAPER, "pretrain.yaml"), TINY["pretrain"] if tiny else [])
    size = cfg.data.image_size

    def build(batch: int):
        backbone = build_backbone(cfg.model.backbone, cfg.model.small_stem, cfg.model.width)
        model = rt.place(self_supervised.METHODS[cfg.pretrain.method].build(backbone, cfg, batch))
        scale = batch / 256   # the stage's learning rates per 256 images; the paper's lars.impl is native
        optimizer = optim.build_optimizer("lars", model, lr_weights=cfg.lars.lr_weights * scale,
                                          lr_biases=cfg.lars.lr_biases * scale, weight_decay=cfg.lars.weight_decay)
        scaler = amp.grad_scaler(PRECISION, rt.device)
        views = [torch.randn(batch, 3, size, size, device=rt.device) for _ in range(2)]
        return (lambda: pretrain.train_step(model, views, optimizer, scaler, PRECISION, rt.device)), batch

    projector = "-".join(map(str, cfg.barlow.projector))
    return f"{cfg.model.backbone} {size} px, projector {projector}", batches_to_try(cfg.train.batch_size), build


def fixmatch(rt: dist.Runtime, tiny: bool) -> tuple[str, list[int], Callable]:
    """(what is timed, the batch, build) for FixMatch's step on configs/paper/fixmatch.yaml, with the network
    of configs/paper/finetune.yaml (which the paper's FixMatch starts from) at the paper's per-GPU batch."""
    cfg = config.load(FixmatchConfig, os.path.join(PAPER, "fixmatch.yaml"), TINY["fixmatch"] if tiny else [])
    network = config.load(FinetuneConfig, os.path.join(PAPER, "finetune.yaml"), TINY["finetune"] if tiny else []).model
    size, mu = cfg.data.image_size, cfg.fixmatch.mu

    def build(batch: int):
        model = rt.place(build_classifier(classifier_arch(network, PAPER_CLASSES)))
        optimizer = optim.classifier_sgd(model, cfg.sgd.lr_backbone, cfg.sgd.lr_head, cfg.sgd.weight_decay,
                                         cfg.sgd.momentum, cfg.sgd.nesterov)
        unlabeled_batch = mu * batch
        algorithm = semi_supervised.ALGORITHMS[cfg.fixmatch.variant](semi_supervised.Setup(
            cfg, rt, model, optimizer, amp.grad_scaler(PRECISION, rt.device), PRECISION, PAPER_CLASSES,
            num_unlabeled=unlabeled_batch, hidden_labels=None))

        def images(n):
            return torch.randn(n, 3, size, size, device=rt.device)
        labeled = {"views": [images(batch)], "label": torch.randint(PAPER_CLASSES, (batch,), device=rt.device)}
        unlabeled = {"views": [images(unlabeled_batch), images(unlabeled_batch)],
                     "index": torch.arange(unlabeled_batch, device=rt.device)}
        return (lambda: algorithm.train_step(model, labeled, unlabeled, 0)), batch + 2 * unlabeled_batch

    return (f"{network.backbone} {size} px, B + {mu}B unlabeled x 2 views",
            [cfg.train.batch_size // GPUS_PER_NODE], build)


def measure(rt: dist.Runtime, quick: bool, budget_s: float) -> dict:
    """Both steps' figures on rt.device (tiny shapes on a CPU or when `quick`); their timed steps stop
    once `budget_s` is spent (2/3 of it for Barlow Twins), each after at least MIN_TIMED_STEPS."""
    tiny = quick or rt.device.type != "cuda"
    peak = peak_tflop_s(rt.device)
    figures = {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
               "shapes": "tiny" if tiny else "paper", "precision": PRECISION, "peak_bf16_tflop_s": peak}
    start = time.perf_counter()
    for name, case, share in (("barlow_twins", barlow_twins, 2 / 3), ("fixmatch", fixmatch, 1.0)):
        what, candidates, build = case(rt, tiny)
        figures[f"{name}_shape"] = what
        found = largest_that_fits(candidates, build, rt.device, start + share * budget_s, peak)
        figures.update({f"{name}_{key}": value for key, value in found.items()})
    figures.update({"anchor_v100_224px_img_s": ANCHOR_V100_224PX_IMG_S,
                    "anchor_v100_96px_img_s": ANCHOR_V100_96PX_IMG_S,
                    "anchor": "not a measurement: the Barlow Twins paper's ImageNet img/s per V100 (1000 epochs "
                              "in ~124 h on 32), x (224/96)^2 for 96 px"})
    return figures


def run(args) -> dict:
    return measure(dist.init("auto"), args.quick, BUDGET_S)
