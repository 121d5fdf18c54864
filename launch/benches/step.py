"""Barlow Twins train step: img/s fp32 vs bf16 autocast, and the stage's step vs a bare loop."""
import importlib.util
import os
import time

import torch

from trainer.runtime import amp, optim
from trainer.algorithms.self_supervised import BarlowTwins
from trainer.runtime.models import build_backbone

_PRETRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrain.py")


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("semiscale_pretrain", _PRETRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(backbone, size_batch):
    torch.manual_seed(0)
    model = BarlowTwins(build_backbone(backbone, small_stem=backbone != "small"), [512, 512, 512],
                        0.0051, size_batch)
    return model, optim.build_optimizer("lars", model, lr_weights=0.1, lr_biases=0.001, weight_decay=1e-6)


def _alternating_img_s(steps: dict, batch: int, rounds: int) -> dict:
    """Median img/s of each step function, timed in turn round after round so drift hits all alike."""
    for step in steps.values():
        step()   # warm-up: allocations, oneDNN kernel selection
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: batch / sorted(t)[len(t) // 2] for name, t in times.items()}


def _bare_step(model, views, opt):
    def step():
        loss = model(*views)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def run(args) -> dict:
    pretrain = _pretrain_module()
    cpu = torch.device("cpu")
    cases = [("small", 28, 256)] if args.quick else [("small", 28, 256), ("resnet18", 96, 32)]
    rounds = 3 if args.quick else 8
    result = {}
    for backbone, size, batch in cases:
        views = [torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)]
        tag = f"{backbone}_{size}px"
        steps = {}
        for precision in ("fp32", "bf16"):
            model, opt = _model(backbone, batch)
            scaler = amp.grad_scaler(precision, cpu)
            steps[precision] = (lambda m=model, o=opt, s=scaler, p=precision:
                                pretrain.train_step(m, views, o, s, p, cpu))
        model, opt = _model(backbone, batch)
        steps["bare_fp32"] = _bare_step(model, views, opt)
        img_s = _alternating_img_s(steps, batch, rounds)
        for name, value in img_s.items():
            result[f"{tag}_{name}_img_s"] = value
        result[f"{tag}_bf16_over_fp32"] = img_s["bf16"] / img_s["fp32"]
        result[f"{tag}_engine_over_bare"] = img_s["fp32"] / img_s["bare_fp32"]
        result[f"{tag}_target_met"] = (result[f"{tag}_bf16_over_fp32"] >= 1.3
                                       and result[f"{tag}_engine_over_bare"] >= 0.95)
    return result
