"""LARS step on the ResNet-50 parameter set: vectorised trainer.runtime.optim.LARS vs a per-parameter loop.

The loop (ReferenceLARS) is the plain reading of the algorithm; tests/test_optim.py checks LARS
against it. Figures: median ms per step, their ratio (target >= 3x), the same for the biases/norm
group alone, and the max abs difference of the parameters after a few identical steps.
On a CPU both versions are bound by memory bandwidth (the same passes over the parameters), so
the ratio stays near 1 there; the multi-tensor ops pay off where per-op launch cost dominates (GPU).
"""
import copy
import statistics
import time

import torch
import torchvision

from trainer.dist import resolve_device
from trainer.runtime.optim import LARS, lars_param_groups

TARGET_RATIO = 3.0
# Barlow Twins' learning rates for a global batch of 2048 (per-256 rates times 2048 / 256)
LR_WEIGHTS, LR_BIASES, WEIGHT_DECAY = 0.2 * 8, 0.0048 * 8, 1.5e-6


class ReferenceLARS(torch.optim.Optimizer):
    """LARS one parameter at a time (same maths and state layout as trainer.runtime.optim.LARS)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0,
                                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                                        one)
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])


def median_ms(steps, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Median wall time of each step function; runs alternate so that both see the same machine load."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, samples in zip(steps, times):
            sync()
            start = time.perf_counter()
            step()
            sync()
            samples.append(time.perf_counter() - start)
    return [1000 * statistics.median(samples) for samples in times]


def set_random_grads(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.device)


def optimizers(model: torch.nn.Module, group_index: int | None = None):
    """Native and reference LARS over the same groups of two identical copies of model."""
    twin = copy.deepcopy(model)
    pair = []
    for cls, m in ((LARS, model), (ReferenceLARS, twin)):
        groups = lars_param_groups(m, LR_WEIGHTS, LR_BIASES, WEIGHT_DECAY)
        pair.append(cls(groups if group_index is None else [groups[group_index]], lr=LR_WEIGHTS))
    return pair, (model, twin)


def run(args) -> dict:
    device = resolve_device("auto")
    arch = "resnet18" if args.quick else "resnet50"
    warmup, repeats, check_steps = (1, 5, 3) if args.quick else (3, 15, 5)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().to(device)

    # agreement: identical random gradients on both copies for a few steps
    (native, reference), (model_a, model_b) = optimizers(model)
    for step in range(check_steps):
        for opt, m in ((native, model_a), (reference, model_b)):
            set_random_grads(m, seed=step)
            opt.step()
    max_diff = max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))

    figures = {"device": device.type, "model": arch, "threads": torch.get_num_threads(),
               "tensors": sum(1 for _ in model.parameters()),
               "elements": sum(p.numel() for p in model.parameters())}
    for prefix, group_index in (("", None), ("biases_norms_", 1)):
        (native, reference), copies = optimizers(model_a, group_index)
        for m in copies:
            set_random_grads(m, seed=check_steps)
        reference_ms, native_ms = median_ms([reference.step, native.step], warmup, repeats, device)
        figures.update({f"{prefix}reference_ms": reference_ms, f"{prefix}native_ms": native_ms,
                        f"{prefix}ratio": reference_ms / native_ms})
    figures.update({"check_steps": check_steps, "max_abs_diff": max_diff, "target_ratio": TARGET_RATIO,
                    "target_met": figures["ratio"] >= TARGET_RATIO})
    return figures
