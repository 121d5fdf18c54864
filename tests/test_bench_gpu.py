"""launch/benches/gpu.py on the CPU: the tiny twin of the paper-shape throughput suite, its FLOP counts
against multiply-adds counted layer by layer, the batch search past out-of-memory errors, the peak table."""
import pytest
import torch
from torch import nn

from launch.benches import gpu
from trainer import dist
from trainer.runtime.models import Classifier, build_backbone

CPU = torch.device("cpu")


def multiply_adds(model: nn.Module, *inputs) -> tuple[int, int]:
    """(the first convolution's multiply-adds, every other convolution's and linear layer's) in one
    forward of `model`, from the shapes each layer sees."""
    counts = []

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            counts.append(out.numel() * module.in_channels // module.groups * kh * kw)
        else:
            counts.append(out.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return counts[0], sum(counts[1:])


def backward_flops(first: int, rest: int) -> int:
    """Forward and backward FLOPs, 2 per multiply-add: the first layer's input needs no gradient (forward +
    weight gradient), every later layer computes its input's gradient too."""
    return 2 * 2 * first + 3 * 2 * rest


def test_flops_of_a_convolution_and_a_linear_layer_are_counted_forward_and_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    conv, linear = 2 * 4 * 6 * 6 * 3 * 3 * 3, 2 * 4 * 6 * 6 * 5   # multiply-adds by hand

    def step():
        model.zero_grad()
        model(x).square().sum().backward()

    assert gpu.step_flops(step) == 2 * 2 * conv + 3 * 2 * linear == backward_flops(*multiply_adds(model, x))


@pytest.fixture(scope="module")
def figures():
    return gpu.measure(dist.Runtime(0, 0, 1, CPU), quick=True, budget_s=0)


def test_cpu_twin_reports_every_figure_with_no_gpu_number(figures):
    for case in ("barlow_twins", "fixmatch"):
        for key in ("shape", "batch", "images_per_step", "step_ms", "img_s", "peak_memory_gib", "flop_per_step",
                    "achieved_tflop_s", "mfu", "batches_out_of_memory"):
            assert f"{case}_{key}" in figures, key
        assert figures[f"{case}_img_s"] > 0 and figures[f"{case}_step_ms"] > 0
        assert figures[f"{case}_img_s"] == pytest.approx(figures[f"{case}_images_per_step"] * 1000
                                                         / figures[f"{case}_step_ms"])
        assert figures[f"{case}_mfu"] == "n/a" and figures[f"{case}_peak_memory_gib"] == "n/a"
        assert figures[f"{case}_batches_out_of_memory"] == "none"
    assert (figures["device"], figures["shapes"], figures["peak_bf16_tflop_s"]) == ("cpu", "tiny", "n/a")
    assert (figures["barlow_twins_batch"], figures["fixmatch_batch"], figures["fixmatch_images_per_step"]) == (8, 2, 30)
    # 1000 epochs of ImageNet's 1,281,167 images in 124 h on 32 V100s, and that per pixel at 96 px
    assert figures["anchor_v100_224px_img_s"] == pytest.approx(89.69, abs=0.01)
    assert figures["anchor_v100_96px_img_s"] == pytest.approx(89.69 * 224 ** 2 / 96 ** 2, abs=0.1)
    assert "not a measurement" in figures["anchor"]


def test_fixmatch_flops_are_the_whole_batch_forward_and_backward(figures):
    # the tiny twin: a small net of width 8 and an 800-class head; 2 labeled + 2 x 14 unlabeled views, 32 px
    model = Classifier(build_backbone("small", False, 8), 800)
    assert figures["fixmatch_flop_per_step"] == backward_flops(*multiply_adds(model, torch.randn(30, 3, 32, 32)))


def test_barlow_twins_flops_are_two_views_and_the_cross_correlation(figures):
    # the tiny twin: a small net of width 8, projector 64-64-64, two views of 8 images at 32 px
    backbone = build_backbone("small", False, 8)
    network = nn.Sequential(backbone, nn.Linear(backbone.out_dim, 64, bias=False), nn.Linear(64, 64, bias=False),
                            nn.Linear(64, 64, bias=False))
    per_view = backward_flops(*multiply_adds(network, torch.randn(8, 3, 32, 32)))
    correlation = 3 * 2 * 64 * 8 * 64   # z1.T @ z2 and its two gradients
    assert figures["barlow_twins_flop_per_step"] == 2 * per_view + correlation


def test_the_search_takes_the_largest_batch_that_does_not_run_out_of_memory():
    assert gpu.batches_to_try(16) == [16, 12, 8, 6, 4, 3, 2]
    built, calls = [], []

    def build(batch):
        built.append(batch)
        if batch > 5:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {batch}")
        return (lambda: calls.append(batch)), 3 * batch

    found = gpu.largest_that_fits(gpu.batches_to_try(16), build, CPU, deadline=0.0, peak="n/a")
    assert built == [16, 12, 8, 6, 4] and found["batch"] == 4 and found["images_per_step"] == 12
    assert found["batches_out_of_memory"] == "16, 12, 8, 6"
    # the counted step, the warm-up, and the fewest timed steps once the deadline has passed
    assert calls == [4] * (1 + gpu.WARMUP_STEPS + gpu.MIN_TIMED_STEPS)


def test_a_gpu_s_peak_is_looked_up_by_its_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                       ("NVIDIA A100-SXM4-80GB", 312), ("Tesla V100-SXM2-32GB", 125), ("NVIDIA L4", "unknown")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert gpu.peak_tflop_s(cuda) == peak, name
    assert gpu.peak_tflop_s(CPU) == "n/a"
