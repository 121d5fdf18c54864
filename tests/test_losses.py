import torch

from multiproc import run_ranks
from trainer.algorithms import losses


def reference_loss(z1, z2, lambd):
    """Eq. (1)-(2) in numpy: batch-standardise, cross-correlate, penalise."""
    n = z1.shape[0]
    a = (z1 - z1.mean(0)) / z1.std(0)
    b = (z2 - z2.mean(0)) / z2.std(0)
    c = a.T @ b / n
    total = 0.0
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            total += (1 - c[i, j]) ** 2 if i == j else lambd * c[i, j] ** 2
    return total


def standardise(z):
    return (z - z.mean(0)) / z.std(0, unbiased=False)


def test_loss_matches_equation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 6, generator=g, dtype=torch.float64)
    z2 = z2 + 0.5 * z1   # some correlation so both terms matter
    ours = losses.barlow_twins(standardise(z1), standardise(z2), 0.0051, 32).item()
    assert abs(ours - reference_loss(z1.numpy(), z2.numpy(), 0.0051)) < 1e-9


def test_lambda_matters():
    g = torch.Generator().manual_seed(1)
    z1, z2 = standardise(torch.randn(16, 4, generator=g)), standardise(torch.randn(16, 4, generator=g))
    assert losses.barlow_twins(z1, z2, 0.0051, 16) != losses.barlow_twins(z1, z2, 0.0, 16)
    assert abs(losses.barlow_twins(z1, z2, 0.5, 16).item() - reference_loss(z1.numpy(), z2.numpy(), 0.5)) < 1e-4


def _shard_loss(rank, z1, z2):
    half = z1.shape[0] // 2
    part = slice(rank * half, (rank + 1) * half)
    a = z1[part].clone().requires_grad_()
    loss = losses.barlow_twins(a, z2[part], 0.0051, z1.shape[0])
    loss.backward()
    return loss.item(), a.grad


def test_global_batch_all_reduce():
    """2 ranks holding half the (standardised) batch each compute the full-batch loss and gradient."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = standardise(torch.randn(16, 5, generator=g)), standardise(torch.randn(16, 5, generator=g))
    full_a = z1.clone().requires_grad_()
    full = losses.barlow_twins(full_a, z2, 0.0051, 16)
    full.backward()
    (l0, g0), (l1, g1) = run_ranks(_shard_loss, 2, z1, z2)
    assert abs(l0 - full.item()) < 1e-5 and abs(l1 - full.item()) < 1e-5
    # each rank's gradient is that of the global loss w.r.t. its rows, times the rank count
    # (DDP then averages parameter gradients over ranks)
    torch.testing.assert_close(torch.cat([g0, g1]) / 2, full_a.grad, rtol=1e-5, atol=1e-6)
