import torch
import torch.nn as nn

from multiproc import run_ranks
from trainer.dist import GlobalBatchNorm, sync_batchnorm


def _bn_shard(rank, x, weight, bias):
    torch.manual_seed(0)
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(x.shape[1])))[0]
    assert isinstance(bn, GlobalBatchNorm)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    half = x.shape[0] // 2
    xs = x[rank * half:(rank + 1) * half].clone().requires_grad_()
    y = bn(xs)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()[...]).sum().backward()
    return y.detach(), xs.grad, bn.weight.grad, bn.running_mean.clone(), bn.running_var.clone()


def test_global_batchnorm_equals_full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * 3 + 1
    weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xf = x.clone().requires_grad_()
    y = bn(xf)
    # the same per-element weights as in each shard (shards index their own halves)
    w = torch.cat([torch.arange(y[:4].numel()).reshape(y[:4].shape).sin()] * 2)
    (y * w).sum().backward()
    r0, r1 = run_ranks(_bn_shard, 2, x, weight, bias)
    torch.testing.assert_close(torch.cat([r0[0], r1[0]]), y.detach(), rtol=1e-5, atol=1e-5)
    # input gradients: the global-batch gradient (DDP does not touch activations)
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]), xf.grad, rtol=1e-4, atol=1e-5)
    # weight gradient: ranks hold their own share; their sum is the full-batch gradient
    torch.testing.assert_close(r0[2] + r1[2], bn.weight.grad, rtol=1e-4, atol=1e-5)
    for r in (r0, r1):
        torch.testing.assert_close(r[3], bn.running_mean)
        torch.testing.assert_close(r[4], bn.running_var)


def test_single_process_keeps_plain_batchnorm():
    model = nn.Sequential(nn.BatchNorm2d(3))
    assert type(sync_batchnorm(model)[0]) is nn.BatchNorm2d
