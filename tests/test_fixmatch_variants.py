"""The FixMatch variants' pseudo-label weights, against the papers' formulas written out by hand in numpy."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multiproc import run_ranks
from trainer.algorithms.fixmatch import (DistributionAlignment, FixMatch, FlexMatch, FreeMatch, SoftMatch,
                                         fixmatch_loss)
from trainer.dist import Runtime

C = 3
CPU = torch.device("cpu")


def logits_of(probs) -> torch.Tensor:
    """float32 logits whose softmax is `probs` (rows of probabilities)."""
    return torch.tensor(np.log(probs), dtype=torch.float32)


def log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def unsupervised_by_hand(strong, targets, weights):
    """Per-image cross-entropy times weight, averaged over the whole unlabeled batch."""
    ce = -log_softmax(strong.double().numpy())[np.arange(len(targets)), targets]
    return (ce * weights).sum() / len(targets)


# ---- FixMatch: today's loss, bit for bit ----

def todays_fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong, threshold, lambda_u):
    """fixmatch_loss as it was before the variants."""
    supervised = F.cross_entropy(logits_labeled.float(), labels)
    with torch.no_grad():
        confidence, pseudo_labels = torch.softmax(logits_weak.detach().float(), dim=1).max(dim=1)
        mask = (confidence >= threshold).float()
    per_image = F.cross_entropy(logits_strong.float(), pseudo_labels, reduction="none")
    unsupervised = (per_image * mask).mean()
    return supervised + lambda_u * unsupervised, unsupervised, pseudo_labels, mask


def test_fixmatch_variant_is_todays_loss_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3 + 2 * 16, 5, generator=g)).requires_grad_()
    labels = torch.tensor([0, 4, 2])
    parts = logits[:3], labels, logits[3:19], logits[19:]
    expected = todays_fixmatch_loss(*parts, 0.7, 2.0)
    assert 0 < expected[3].sum() < 16   # some pass the threshold, some do not
    (expected_grad,) = torch.autograd.grad(expected[0], logits)
    labeler = FixMatch(0.7)
    out = fixmatch_loss(*parts, labeler, 2.0, torch.arange(16))
    (grad,) = torch.autograd.grad(out.total, logits)
    for mine, theirs in zip((out.total, out.unsupervised, out.pseudo_labels, out.mask, grad),
                            (*expected, expected_grad)):
        assert torch.equal(mine, theirs)
    assert labeler.state_dict() == {}


# ---- FlexMatch ----

def flexmatch_by_hand(latest, probs, tau):
    """FlexMatch with threshold warm-up: (weights, class thresholds) of a batch, given each image's latest
    confident prediction (-1: none yet)."""
    latest = np.array(latest)
    sigma = np.array([(latest == c).sum() for c in range(C)])
    beta = sigma / max(sigma.max(), (latest == -1).sum())
    class_threshold = tau * beta / (2 - beta)
    confidence, labels = probs.max(1), probs.argmax(1)
    return (confidence >= class_threshold[labels]).astype(float), class_threshold


def test_flexmatch_class_thresholds_follow_each_class_learning_status():
    tau = 0.8
    labeler = FlexMatch(tau, C, 6, Runtime())
    assert labeler.state_dict()["latest"].tolist() == [-1] * 6
    g = torch.Generator().manual_seed(1)
    labeled, labels = torch.randn(2, C, generator=g), torch.tensor([0, 2])
    # step 1: nothing learnt yet, every class threshold is 0; images 0, 1 (class 0) and 2 (class 1) pass tau
    step1 = np.array([[0.90, 0.05, 0.05], [0.85, 0.10, 0.05], [0.02, 0.95, 0.03], [0.25, 0.25, 0.50]])
    # step 2: thresholds 0.8 * M(2/3) = 0.4 for class 0, 0.8 * M(1/3) = 0.16 for class 1, 0 for class 2;
    # image 0 becomes confident in class 1; image 1 is no longer confident but keeps its class 0
    step2 = np.array([[0.45, 0.30, 0.25], [0.38, 0.31, 0.31], [0.08, 0.82, 0.10], [0.33, 0.33, 0.34]])
    latest = [-1] * 6
    for probs, index, expected_weights, expected_latest in (
            (step1, [0, 1, 2, 3], [1, 1, 1, 1], [0, 0, 1, -1, -1, -1]),
            (step2, [4, 1, 0, 3], [1, 0, 1, 1], [1, 0, 1, -1, -1, -1])):
        weights, class_threshold = flexmatch_by_hand(latest, probs, tau)
        assert weights.tolist() == expected_weights
        strong = torch.randn(4, C, generator=g)
        out = fixmatch_loss(labeled, labels, logits_of(probs), strong, labeler, 1.0, torch.tensor(index))
        assert out.pseudo_labels.tolist() == probs.argmax(1).tolist()
        assert out.mask.tolist() == expected_weights
        assert out.unsupervised.item() == pytest.approx(unsupervised_by_hand(strong, probs.argmax(1), weights),
                                                        rel=1e-6)
        for i, p in zip(index, probs):
            if p.max() >= tau:
                latest[i] = int(p.argmax())
        assert labeler.state_dict()["latest"].tolist() == latest == expected_latest
    assert class_threshold == pytest.approx([0.4, 0.16, 0.0])


# ---- FreeMatch ----

def test_freematch_threshold_follows_the_mean_confidence_scaled_per_class():
    m = 0.5   # so that two steps move the statistics visibly
    labeler = FreeMatch(C, m, CPU)
    state = labeler.state_dict()
    assert state["tau"].item() == pytest.approx(1 / 3) and state["p_class"].tolist() == pytest.approx([1 / 3] * 3)
    batches = [np.array([[0.90, 0.05, 0.05], [0.20, 0.60, 0.20], [0.25, 0.25, 0.50], [0.40, 0.30, 0.30]]),
               np.array([[0.70, 0.20, 0.10], [0.15, 0.45, 0.40], [0.30, 0.30, 0.40], [0.35, 0.60, 0.05]])]
    tau, p = 1 / 3, np.full(C, 1 / 3)
    for probs, expected in zip(batches, ([1, 1, 1, 0], [1, 0, 1, 1])):
        confidence, labels = probs.max(1), probs.argmax(1)
        tau = m * tau + (1 - m) * confidence.mean()
        p = m * p + (1 - m) * probs.mean(0)
        weights = (confidence >= (tau * p / p.max())[labels]).astype(float)
        # step 2: class 1's threshold 0.473 fails image 1 at 0.45; class 2's 0.368 passes image 2 at 0.40
        assert weights.tolist() == expected
        pseudo, mine = labeler(logits_of(probs))
        assert pseudo.tolist() == labels.tolist() and mine.tolist() == expected
        state = labeler.state_dict()
        assert state["tau"].item() == pytest.approx(tau, rel=1e-6)
        np.testing.assert_allclose(state["p_class"].numpy(), p, rtol=1e-6)
    assert tau == pytest.approx(0.5020833, rel=1e-6)


# ---- SoftMatch ----

def softmatch_weights_by_hand(confidence, mu, var):
    return np.where(confidence < mu, np.exp(-(confidence - mu) ** 2 / (2 * var)), 1.0)


def test_softmatch_weights_are_a_truncated_gaussian_of_the_running_confidence():
    m = 0.5
    labeler = SoftMatch(C, m, CPU)
    assert labeler.state_dict() == {"mu": pytest.approx(1 / 3), "var": 1.0}
    batches = [np.array([[0.90, 0.05, 0.05], [0.20, 0.60, 0.20], [0.25, 0.25, 0.50], [0.40, 0.30, 0.30]]),
               np.array([[0.70, 0.20, 0.10], [0.15, 0.45, 0.40], [0.30, 0.30, 0.40], [0.35, 0.60, 0.05]])]
    mu, var = 1 / 3, 1.0
    for probs in batches:
        confidence = probs.max(1)
        mu = m * mu + (1 - m) * confidence.mean()
        var = m * var + (1 - m) * confidence.var(ddof=1)
        weights = softmatch_weights_by_hand(confidence, mu, var)
        _, mine = labeler(logits_of(probs))
        np.testing.assert_allclose(mine.numpy(), weights, rtol=1e-6)
        state = labeler.state_dict()
        assert state["mu"].item() == pytest.approx(mu, rel=1e-6) and state["var"].item() == pytest.approx(var, rel=1e-6)
    assert (mu, var) == pytest.approx((0.5020833, 0.2711458), rel=1e-6)
    assert weights == pytest.approx([1.0, 0.99501, 0.98097, 1.0], abs=1e-5)


def test_soft_weights_scale_each_image_loss_and_gradient():
    """momentum 0: the batch's own statistics, whose small variance gives clearly fractional weights."""
    probs = np.array([[0.90, 0.05, 0.05], [0.20, 0.60, 0.20], [0.25, 0.25, 0.50], [0.40, 0.30, 0.30]])
    confidence = probs.max(1)
    weights = softmatch_weights_by_hand(confidence, confidence.mean(), confidence.var(ddof=1))
    assert weights == pytest.approx([1.0, 1.0, 0.898, 0.651], abs=1e-3)
    g = torch.Generator().manual_seed(2)
    labeled, strong, labels = torch.randn(2, C, generator=g), torch.randn(4, C, generator=g), torch.tensor([1, 0])
    logits = torch.cat([labeled, logits_of(probs), strong]).requires_grad_()
    out = fixmatch_loss(logits[:2], labels, logits[2:6], logits[6:], SoftMatch(C, 0.0, CPU), 2.0)
    out.total.backward()
    targets = probs.argmax(1)
    supervised = -log_softmax(labeled.double().numpy())[[0, 1], labels.numpy()].mean()
    unsupervised = unsupervised_by_hand(strong, targets, weights)
    assert out.unsupervised.item() == pytest.approx(unsupervised, rel=1e-6)
    assert out.total.item() == pytest.approx(supervised + 2.0 * unsupervised, rel=1e-6)
    expected = 2.0 * weights[:, None] * (np.exp(log_softmax(strong.double().numpy())) - np.eye(C)[targets]) / 4
    np.testing.assert_allclose(logits.grad[6:].double().numpy(), expected, atol=1e-7)
    assert (logits.grad[2:6] == 0).all()


# ---- distribution alignment ----

def test_distribution_alignment_divides_by_the_running_mean_prediction():
    m = 0.5
    probs = np.array([[0.50, 0.45, 0.05], [0.60, 0.30, 0.10], [0.55, 0.15, 0.30], [0.30, 0.20, 0.50]])
    for target in (None, [0.2, 0.5, 0.3]):
        labeler = FixMatch(0.5, DistributionAlignment(C, target, m, CPU))
        p_model = np.full(C, 1 / 3)
        wanted = np.full(C, 1 / 3) if target is None else np.array(target)
        for _ in range(2):
            p_model = m * p_model + (1 - m) * probs.mean(0)
            aligned = probs * wanted / p_model
            aligned /= aligned.sum(1, keepdims=True)
            mine = labeler.alignment(torch.tensor(probs, dtype=torch.float32)).double().numpy()
            np.testing.assert_allclose(mine, aligned, rtol=1e-6)
            np.testing.assert_allclose(mine.sum(1), 1.0, rtol=1e-6)
            np.testing.assert_allclose(labeler.state_dict()["alignment"]["p_model"].numpy(), p_model, rtol=1e-6)
    # class 0, over-predicted, loses image 0 to class 1, and image 2's confidence in it falls below 0.5
    labeler = FixMatch(0.5, DistributionAlignment(C, None, m, CPU))
    p_model = m / 3 + (1 - m) * probs.mean(0)
    aligned = probs / p_model
    aligned /= aligned.sum(1, keepdims=True)
    pseudo, weights = labeler(logits_of(probs))
    assert probs.argmax(1).tolist() == [0, 0, 0, 2] and (probs.max(1) >= 0.5).all()
    assert pseudo.tolist() == aligned.argmax(1).tolist() == [1, 0, 0, 2]
    assert weights.tolist() == (aligned.max(1) >= 0.5).tolist() == [True, True, False, True]
    assert labeler.state_dict()["alignment"]["p_model"].tolist() == pytest.approx(p_model.tolist())


# ---- state: a resumed run continues identically ----

def flat(state: dict, prefix="") -> dict:
    """Nested state dicts as {"alignment.p_model": tensor, ...}."""
    out = {}
    for k, v in state.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def same_state(a: dict, b: dict) -> bool:
    a, b = flat(a), flat(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


VARIANTS = ("fixmatch", "flexmatch", "freematch", "softmatch")


def aligned(variant, num_classes, threshold, num_unlabeled, momentum, runtime=Runtime()):
    """`variant`'s pseudo-labeler after distribution alignment, its statistics moving at `momentum`."""
    alignment = DistributionAlignment(num_classes, None, momentum, runtime.device)
    if variant == "fixmatch":
        return FixMatch(threshold, alignment)
    if variant == "flexmatch":
        return FlexMatch(threshold, num_classes, num_unlabeled, runtime, alignment)
    return {"freematch": FreeMatch, "softmatch": SoftMatch}[variant](num_classes, momentum, runtime.device, alignment)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_round_trip_continues_identically(variant):
    g = torch.Generator().manual_seed(3)
    batches = [(2 * torch.randn(8, 4, generator=g), torch.randperm(20, generator=g)[:8]) for _ in range(3)]
    make = dict(variant=variant, num_classes=4, threshold=0.6, num_unlabeled=20, momentum=0.9)
    original = aligned(**make)
    original(*batches[0])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)   # as a checkpoint holds it
    snapshot = original.state_dict()
    buffer.seek(0)
    resumed = aligned(**make)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert same_state(resumed.state_dict(), snapshot)
    assert not same_state(snapshot, aligned(**make).state_dict())   # the first batch counted
    for logits, index in batches[1:]:
        (labels, weights), (labels_resumed, weights_resumed) = original(logits, index), resumed(logits, index)
        assert torch.equal(labels, labels_resumed) and torch.equal(weights, weights_resumed)
    assert same_state(original.state_dict(), resumed.state_dict())
    assert not same_state(snapshot, original.state_dict())   # the statistics moved on, the snapshot did not
    buffer.seek(0)
    assert same_state(snapshot, torch.load(buffer, weights_only=True))


# ---- two ranks hold the statistics of the global batch ----

def _steps(rank, world, batches):
    """Every variant (with distribution alignment) over `batches`, this rank's share of each:
    per variant, the weights of every step and the final state."""
    out = []
    for variant in VARIANTS:
        labeler = aligned(variant, 4, 0.5, num_unlabeled=40, momentum=0.5, runtime=Runtime(rank=rank, world=world))
        weights = []
        for logits, index in batches:
            share = slice(rank * len(index) // world, (rank + 1) * len(index) // world)
            weights.append(labeler(logits[share], index[share])[1])
        out.append((torch.cat(weights), *flat(labeler.state_dict()).values()))
    return out


def test_two_ranks_hold_the_global_batch_statistics():
    g = torch.Generator().manual_seed(4)
    batches = [(2 * torch.randn(8, 4, generator=g), torch.randperm(40, generator=g)[:8]) for _ in range(3)]
    alone = _steps(0, 1, batches)
    assert any(0 < w.sum() < len(w) for w, *_ in alone[:3])   # thresholds that pass some images, not all
    for rank, ranks in enumerate(run_ranks(_steps, 2, 2, batches)):
        for variant, mine, theirs in zip(VARIANTS, ranks, alone):
            weights = torch.cat([w.reshape(2, -1)[rank] for w in theirs[0].split(8)])   # this rank's images
            torch.testing.assert_close(mine[0], weights, rtol=1e-6, atol=0, msg=variant)
            for a, b in zip(mine[1:], theirs[1:]):   # the state, alike on every rank
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=variant)
