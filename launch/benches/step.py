"""Barlow Twins train step: img/s fp32 vs bf16 autocast, and the stage's step vs a bare loop."""
import importlib.util
import os
import time

import torch

from trainer import engine, optim
from trainer.models import BarlowTwins, build_backbone

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


def _img_s(step, batch: int, steps: int) -> float:
    step()   # warm-up: allocations, oneDNN kernel selection
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]


def run(args) -> dict:
    pretrain = _pretrain_module()
    cpu = torch.device("cpu")
    cases = [("small", 28, 256)] if args.quick else [("small", 28, 256), ("resnet18", 96, 32)]
    steps = 3 if args.quick else 6
    result = {}
    for backbone, size, batch in cases:
        views = [torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)]
        tag = f"{backbone}_{size}px"
        for precision in ("fp32", "bf16"):
            model, opt = _model(backbone, batch)
            scaler = engine.grad_scaler(precision, cpu)
            result[f"{tag}_{precision}_img_s"] = _img_s(
                lambda: pretrain.train_step(model, views, opt, scaler, precision, cpu), batch, steps)

        model, opt = _model(backbone, batch)

        def bare():
            loss = model(*views)
            opt.zero_grad()
            loss.backward()
            opt.step()
        result[f"{tag}_bare_fp32_img_s"] = _img_s(bare, batch, steps)
        result[f"{tag}_bf16_over_fp32"] = result[f"{tag}_bf16_img_s"] / result[f"{tag}_fp32_img_s"]
        result[f"{tag}_engine_over_bare"] = result[f"{tag}_fp32_img_s"] / result[f"{tag}_bare_fp32_img_s"]
        result[f"{tag}_target_met"] = (result[f"{tag}_bf16_over_fp32"] >= 1.3
                                       and result[f"{tag}_engine_over_bare"] >= 0.95)
    return result
