import io
import math

import pytest
import torch
from torch import nn

from launch.bench import main as bench_main
from launch.benches.lars import ReferenceLARS
from trainer.runtime import optim, schedule
from trainer.runtime.optim import LARS

torch.set_num_threads(1)


def make_params(seed=0):
    """Three groups covering the LARS branches (eta large so that updates are well above rounding)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return nn.Parameter(torch.randn(*shape, generator=gen))

    decayed = [rand(8, 4, 3, 3), nn.Parameter(torch.zeros(6, 5)), rand(5, 5), rand(7)]  # zero-norm, 1-D adapted
    plain = [rand(4, 4), rand(3)]
    excluded = [rand(8), rand(8)]
    groups = [dict(params=decayed, lr=0.5, weight_decay=0.01),
              dict(params=plain, lr=0.3, weight_decay=0.0),
              dict(params=excluded, lr=0.05, weight_decay=0.01, lars_exclude=True)]  # decay must be ignored
    return groups, decayed + plain + excluded


def set_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    params[2].grad = torch.zeros_like(params[2])   # zero grad, decayed: the update is weight decay alone
    params[4].grad = torch.zeros_like(params[4])   # zero grad, no decay: zero update norm -> trust 1
    if step % 2 == 0:
        params[5].grad = None                      # no grad: parameter and state untouched


def build(cls, seed=0):
    groups, params = make_params(seed)
    return cls(groups, lr=0.1, momentum=0.8, eta=0.1), params


def test_lars_matches_per_parameter_reference():
    native, native_params = build(LARS)
    reference, reference_params = build(ReferenceLARS)
    initial = [p.detach().clone() for p in native_params]
    for step in range(5):
        set_grads(native_params, step)
        set_grads(reference_params, step)
        native.step()
        reference.step()
        for p, q in zip(native_params, reference_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            if p in native.state:
                torch.testing.assert_close(native.state[p]["momentum_buffer"],
                                           reference.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-7)
    moved = [(p - p0).abs().max().item() for p, p0 in zip(native_params, initial)]
    assert min(moved[:4] + moved[5:]) > 1e-3   # every parameter with a non-zero update really moved
    assert moved[4] == 0.0


def test_first_step_matches_formula():
    p0, g = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    b0, gb = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    w, b, zero = nn.Parameter(p0.clone()), nn.Parameter(b0.clone()), nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad, b.grad, zero.grad = g.clone(), gb.clone(), torch.ones(3, dtype=torch.float64)
    lr, wd, eta = 0.7, 0.05, 0.002
    LARS([dict(params=[w, zero], weight_decay=wd), dict(params=[b], weight_decay=wd, lars_exclude=True)],
         lr=lr, eta=eta).step()
    update = g + wd * p0
    expected_w = p0 - lr * eta * p0.norm() / update.norm() * update
    torch.testing.assert_close(w.detach(), expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), b0 - lr * gb, rtol=1e-12, atol=1e-12)   # no decay, no trust
    torch.testing.assert_close(zero.detach(), torch.full((3,), -lr, dtype=torch.float64))  # ||p|| = 0 -> trust 1


def test_state_dict_round_trip_continues_identically():
    original, params = build(LARS)
    for step in range(3):
        set_grads(params, step)
        original.step()
    blob = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": original.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)

    restored, restored_params = build(LARS, seed=1)   # different values, same structure
    with torch.no_grad():
        for p, value in zip(restored_params, saved["params"]):
            p.copy_(value)
    restored.load_state_dict(saved["optimizer"])
    for step in range(3, 6):
        set_grads(params, step)
        set_grads(restored_params, step)
        original.step()
        restored.step()
    for p, q in zip(params, restored_params):
        assert torch.equal(p, q)


def tiny_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)   # frozen parameters stay out of the groups
    return model


def test_param_groups_split_weights_from_biases_and_norms():
    model = tiny_model()
    weights, biases = optim.lars_param_groups(model, lr_weights=0.2, lr_biases=0.01, weight_decay=1e-4)
    assert [id(p) for p in weights["params"]] == [id(model[0].weight), id(model[3].weight)]
    assert [id(p) for p in biases["params"]] == [id(model[1].weight), id(model[1].bias), id(model[3].bias)]
    assert (weights["base_lr"], weights["weight_decay"], weights["lars_exclude"]) == (0.2, 1e-4, False)
    assert (biases["base_lr"], biases["weight_decay"], biases["lars_exclude"]) == (0.01, 0.0, True)


def test_build_optimizer_never_decays_biases():
    opt = optim.build_optimizer("lars", tiny_model(), lr_weights=0.2, weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2]


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="expected one of lars, apex_lars$"):
        optim.build_optimizer("rmsprop", tiny_model(), lr_weights=0.1)


def test_apex_lars_without_apex_is_one_line_error():
    try:
        import apex.parallel.LARC  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("NVIDIA apex is installed")
    with pytest.raises(ValueError) as error:
        optim.build_optimizer("apex_lars", tiny_model(), lr_weights=0.1)
    message = str(error.value)
    assert "\n" not in message and "apex" in message and "lars.impl=native" in message


def expected_factor(step, total, warmup, final=0.001):
    if step < warmup:
        return step / warmup
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return q + final * (1 - q)


@pytest.mark.parametrize("step", [0, 5, 10, 55, 99, 100])
def test_lr_factor_follows_warmup_then_cosine(step):
    assert schedule.lr_factor(step, 100, 10) == pytest.approx(expected_factor(step, 100, 10), abs=1e-12)


def test_lr_factor_key_values():
    assert schedule.lr_factor(0, 100, 10) == 0.0
    assert schedule.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert schedule.lr_factor(100, 100, 10) == pytest.approx(0.001)
    assert schedule.lr_factor(250, 100, 10) == pytest.approx(0.001)   # past the end: stays at the floor
    assert schedule.lr_factor(0, 100, 0) == pytest.approx(1.0)
    assert schedule.lr_factor(100, 100, 10, final_factor=0.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("total, warmup", [(0, 0), (10, 11), (10, -1)])
def test_lr_factor_rejects_bad_lengths(total, warmup):
    with pytest.raises(ValueError, match="warmup_steps"):
        schedule.lr_factor(0, total, warmup)


def test_apply_lr_scales_each_group_base_lr():
    opt = optim.build_optimizer("lars", tiny_model(), lr_weights=0.4, lr_biases=0.01)
    schedule.apply_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.0025)]
    with pytest.raises(ValueError, match="base_lr"):
        schedule.apply_lr(torch.optim.SGD(tiny_model().parameters(), lr=0.1), 0.5)


def test_bench_rejects_unknown_suite(capsys):
    assert bench_main(["--suite", "no_such_suite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_such_suite" in err and "lars" in err
