"""The FixMatch loss: supervised cross-entropy + lambda_u x weighted pseudo-label cross-entropy, and the
variants that differ only in how the unlabeled images' pseudo-labels are weighted (PseudoLabeler), each
registered as a semi-supervised algorithm under its fixmatch.variant name (trainer.algorithms.semi_supervised).

    fixmatch   (Sohn et al. 2020)   weight 1 where the weak view's top probability reaches a fixed threshold
    flexmatch  (Zhang et al. 2021)  the threshold scaled per class by how many images that class has won
    freematch  (Wang et al. 2023)   a threshold that follows the model's mean confidence, scaled per class
    softmatch  (Chen et al. 2023)   a soft weight: a Gaussian in the confidence below its running mean

Any of them may first align the weak-view distribution (ReMixMatch / AdaMatch distribution alignment).
Their running statistics are state (state_dict / load_state_dict, the algorithm's "pseudo_labeler") and
are taken over the global batch: every rank holds the same statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.algorithms.semi_supervised import Algorithm, SemiSupervisedLoss, Setup, register
from trainer import dist

MOMENTUM = 0.999   # of every running statistic


def fixmatch_loss(logits_labeled: torch.Tensor, labels: torch.Tensor, logits_weak: torch.Tensor,
                  logits_strong: torch.Tensor, pseudo_labeler: PseudoLabeler, lambda_u: float,
                  index: torch.Tensor | None = None) -> SemiSupervisedLoss:
    """Weak-view predictions become hard targets for the strong views (no gradient through them).

    `pseudo_labeler` weighs them (and moves its statistics on by this batch). `index`: the unlabeled
    images' rows in their split (batch["index"]), which FlexMatch needs.
    The unsupervised term is averaged over the whole unlabeled batch, weight 0 counting as 0, so its
    weight falls when few predictions are confident. Logits are taken in float32.
    """
    supervised = F.cross_entropy(logits_labeled.float(), labels)
    pseudo_labels, weight = pseudo_labeler(logits_weak, index)
    per_image = F.cross_entropy(logits_strong.float(), pseudo_labels, reduction="none")
    unsupervised = (per_image * weight).mean()
    return SemiSupervisedLoss(supervised + lambda_u * unsupervised, supervised, unsupervised, pseudo_labels, weight)


def _global_mean(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means of all ranks' (n, k) rows together, in float64, and their total count: one all-reduce
    of the sums and the count, so ranks with unequal batches still weigh every image alike."""
    sums = torch.cat([rows.double().sum(0), rows.new_tensor([len(rows)], dtype=torch.float64)])
    dist.all_reduce_(sums)
    return sums[:-1] / sums[-1], sums[-1]


def _ema_(average: torch.Tensor, value: torch.Tensor, momentum: float):
    average.mul_(momentum).add_(value, alpha=1 - momentum)


class TensorState:
    """state_dict / load_state_dict over the tensors named in STATE. state_dict copies them, so that it
    stays the snapshot it was when the statistics move on."""

    STATE: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.STATE}

    def load_state_dict(self, state: dict):
        for name in self.STATE:
            getattr(self, name).copy_(state[name])


class DistributionAlignment(TensorState):
    """ReMixMatch / AdaMatch distribution alignment: weak-view probabilities times target / p_model,
    renormalised, where p_model is the running mean of the model's unlabeled predictions (from uniform,
    updated with the batch first). It pulls the pseudo-labels' marginal towards the target, so that a
    class the model over-predicts early on does not take over the confident pseudo-labels."""

    STATE = ("p_model",)

    def __init__(self, num_classes: int, target: torch.Tensor | None, momentum: float, device: torch.device):
        target = torch.ones(num_classes) if target is None else torch.as_tensor(target, dtype=torch.float64)
        self.target = (target / target.sum()).to(device, torch.float64)
        self.p_model = torch.full((num_classes,), 1 / num_classes, dtype=torch.float64, device=device)
        self.momentum = momentum

    @torch.no_grad()
    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        _ema_(self.p_model, _global_mean(probs)[0], self.momentum)
        aligned = probs * (self.target / self.p_model).to(probs.dtype)
        return aligned / aligned.sum(dim=1, keepdim=True)


class PseudoLabeler(TensorState):
    """The weak view's argmax as pseudo-label, after distribution alignment if any; subclasses weigh it
    and keep their running statistics (STATE, the alignment's under "alignment")."""

    def __init__(self, alignment: DistributionAlignment | None = None):
        self.alignment = alignment

    @torch.no_grad()
    def __call__(self, logits_weak: torch.Tensor, index: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-labels, their float32 weights) of this rank's unlabeled batch; statistics move on."""
        probs = torch.softmax(logits_weak.detach().float(), dim=1)
        if self.alignment is not None:
            probs = self.alignment(probs)
        confidence, labels = probs.max(dim=1)
        return labels, self.weight(probs, confidence, labels, index).float()

    def weight(self, probs, confidence, labels, index) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.alignment is not None:
            state["alignment"] = self.alignment.state_dict()
        return state

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        if self.alignment is not None:
            self.alignment.load_state_dict(state["alignment"])


class FixMatch(PseudoLabeler):
    """FixMatch: weight 1 where the pseudo-label's probability reaches the threshold, 0 elsewhere."""

    def __init__(self, threshold: float, alignment: DistributionAlignment | None = None):
        super().__init__(alignment)
        self.threshold = threshold

    def weight(self, probs, confidence, labels, index) -> torch.Tensor:
        return confidence >= self.threshold


class FlexMatch(FixMatch):
    """FlexMatch (curriculum pseudo-labeling, with its threshold warm-up): a class's threshold is
    threshold x M(beta(c)), M(x) = x / (2 - x), beta(c) = sigma(c) / max(max_c sigma, unused), where
    sigma(c) counts the unlabeled images whose latest confident (>= threshold) prediction was c and
    `unused` those never predicted confidently. Classes the model has learnt little of get lower
    thresholds; early on, while most images are unused, every threshold is low.

    The latest prediction per image (-1: none yet) is state; the thresholds come from it before this
    batch, which then updates it, every rank's batch on every rank (batches of equal size)."""

    STATE = ("latest",)

    def __init__(self, threshold: float, num_classes: int, num_unlabeled: int, runtime: dist.Runtime,
                 alignment: DistributionAlignment | None = None):
        super().__init__(threshold, alignment)
        self.num_classes, self.rank, self.world = num_classes, runtime.rank, runtime.world
        self.latest = torch.full((num_unlabeled,), -1, dtype=torch.int64, device=runtime.device)

    def weight(self, probs, confidence, labels, index) -> torch.Tensor:
        counts = torch.bincount(self.latest + 1, minlength=self.num_classes + 1)   # [unused, sigma(0), ...]
        beta = counts[1:].double() / counts.max()
        passed = confidence >= (self.threshold * beta / (2 - beta))[labels]
        # all ranks' (image, confident prediction or -1): an all-gather as a sum of zeros but for one's slot
        mine = torch.stack([index.to(labels.device), torch.where(confidence >= self.threshold, labels, -1)])
        slots = mine.new_zeros((self.world, *mine.shape))
        slots[self.rank] = mine
        image, predicted = dist.all_reduce_(slots).transpose(0, 1).flatten(1)
        # an image appears once in a global batch, so where() can keep the others' old value: no boolean
        # indexing, whose size would make the host wait for the device
        self.latest[image] = torch.where(predicted >= 0, predicted, self.latest[image])
        return passed


class FreeMatch(PseudoLabeler):
    """FreeMatch (self-adaptive thresholding, without its fairness loss): a global threshold tau, the
    running mean of the top probability (from 1/C), scaled per class by p(c) / max p, p the running mean
    of the probability vector (from uniform). Both are updated with the batch before it is masked: the
    threshold rises as the model grows confident, lower for classes it predicts less."""

    STATE = ("tau", "p_class")

    def __init__(self, num_classes: int, momentum: float, device: torch.device,
                 alignment: DistributionAlignment | None = None):
        super().__init__(alignment)
        self.momentum = momentum
        self.tau = torch.tensor(1 / num_classes, dtype=torch.float64, device=device)
        self.p_class = torch.full((num_classes,), 1 / num_classes, dtype=torch.float64, device=device)

    def weight(self, probs, confidence, labels, index) -> torch.Tensor:
        mean = _global_mean(torch.cat([confidence[:, None], probs], dim=1))[0]
        _ema_(self.tau, mean[0], self.momentum)
        _ema_(self.p_class, mean[1:], self.momentum)
        return confidence >= (self.tau * self.p_class / self.p_class.max())[labels]


class SoftMatch(PseudoLabeler):
    """SoftMatch: weight exp(-(p - mu)^2 / (2 var)) for a top probability p below mu, 1 above, where mu
    and var are the running mean and (unbiased) variance of p (from 1/C and 1), updated with the batch
    first. Unconfident pseudo-labels still count a little instead of not at all, which keeps more of
    the unlabeled data (quantity) while the confident ones dominate (quality)."""

    STATE = ("mu", "var")

    def __init__(self, num_classes: int, momentum: float, device: torch.device,
                 alignment: DistributionAlignment | None = None):
        super().__init__(alignment)
        self.momentum = momentum
        self.mu = torch.tensor(1 / num_classes, dtype=torch.float64, device=device)
        self.var = torch.tensor(1.0, dtype=torch.float64, device=device)

    def weight(self, probs, confidence, labels, index) -> torch.Tensor:
        (mean, mean_square), n = _global_mean(torch.stack([confidence, confidence * confidence], dim=1))
        _ema_(self.mu, mean, self.momentum)
        _ema_(self.var, (mean_square - mean * mean) * n / (n - 1), self.momentum)
        below = (confidence - self.mu).clamp(max=0)
        return torch.exp(-below * below / (2 * self.var))


# ---- the algorithms: FixMatch's loss with each variant's pseudo-labeler ----

class FixMatchFamily(Algorithm):
    """FixMatch's loss with a variant's pseudo-labeler, whose running statistics are state."""

    def __init__(self, setup: Setup, pseudo_labeler: PseudoLabeler):
        super().__init__(setup)
        self.pseudo_labeler = pseudo_labeler
        self.state["pseudo_labeler"] = pseudo_labeler

    def loss(self, logits_labeled, labels, logits_weak, logits_strong, index) -> SemiSupervisedLoss:
        return fixmatch_loss(logits_labeled, labels, logits_weak, logits_strong, self.pseudo_labeler,
                             self.setup.cfg.fixmatch.lambda_u, index)


def _alignment(setup: Setup) -> DistributionAlignment | None:
    """fixmatch.distribution_alignment: towards the uniform distribution."""
    return (DistributionAlignment(setup.num_classes, None, MOMENTUM, setup.rt.device)
            if setup.cfg.fixmatch.distribution_alignment else None)


@register("fixmatch")
def _fixmatch(setup: Setup) -> FixMatchFamily:
    return FixMatchFamily(setup, FixMatch(setup.cfg.fixmatch.threshold, _alignment(setup)))


@register("flexmatch")
def _flexmatch(setup: Setup) -> FixMatchFamily:
    return FixMatchFamily(setup, FlexMatch(setup.cfg.fixmatch.threshold, setup.num_classes, setup.num_unlabeled,
                                           setup.rt, _alignment(setup)))


@register("freematch")
def _freematch(setup: Setup) -> FixMatchFamily:
    return FixMatchFamily(setup, FreeMatch(setup.num_classes, MOMENTUM, setup.rt.device, _alignment(setup)))


@register("softmatch")
def _softmatch(setup: Setup) -> FixMatchFamily:
    return FixMatchFamily(setup, SoftMatch(setup.num_classes, MOMENTUM, setup.rt.device, _alignment(setup)))
