"""Optimisers: vectorised LARS (Barlow Twins variant) or apex LARC for pre-training, SGD for classifiers."""
import torch
from torch import nn
from data.errors import InputError

OPTIMIZERS = ("lars", "apex_lars")


class LARS(torch.optim.Optimizer):
    """LARS as used by Barlow Twins, with every step done by multi-tensor `torch._foreach_*` ops.

    For each parameter p with gradient g, in a group without `lars_exclude`:
        g <- g + weight_decay * p
        g <- q * g,  q = eta * ||p|| / ||g||  if both norms > 0, else 1
    and for every parameter:
        buf <- momentum * buf + g;   p <- p - lr * buf
    Groups flagged `lars_exclude=True` (biases and norm-layer parameters) get neither weight decay
    nor the trust ratio. Gradients are left untouched. All parameters of a group must share one device.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("LARS does not support sparse gradients")
            bufs = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            if group["lars_exclude"]:
                torch._foreach_add_(bufs, grads)
            else:
                updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                torch._foreach_addcmul_(bufs, updates, trust_ratios(params, updates, group["eta"]))
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def trust_ratios(params: list[torch.Tensor], updates: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
    """Per-tensor eta * ||p|| / ||u|| (1 where either norm is 0), as 0-d tensors on the params' device."""
    param_norms = torch.stack(torch._foreach_norm(params))
    update_norms = torch.stack(torch._foreach_norm(updates))
    ratios = torch.where((param_norms > 0) & (update_norms > 0), eta * param_norms / update_norms,
                         torch.ones_like(param_norms))
    return list(ratios.unbind(0))


def lars_param_groups(model: nn.Module, lr_weights: float, lr_biases: float,
                      weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases/norm parameters (p.ndim == 1: neither).

    Each group keeps its base learning rate as `base_lr`; trainer.runtime.schedule.apply_lr scales it.
    Frozen parameters (requires_grad=False) are left out.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        dict(params=[p for p in trainable if p.ndim != 1], lr=lr_weights, base_lr=lr_weights,
             weight_decay=weight_decay, lars_exclude=False),
        dict(params=[p for p in trainable if p.ndim == 1], lr=lr_biases, base_lr=lr_biases,
             weight_decay=0.0, lars_exclude=True),
    ]


def build_optimizer(name: str, model: nn.Module, *, lr_weights: float, lr_biases: float | None = None,
                    weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
    """An optimiser over lars_param_groups(model, ...): `name` is one of OPTIMIZERS.

    lr_biases defaults to lr_weights. Biases and norm parameters never get weight decay.
    "apex_lars" is NVIDIA apex's LARC (scaling mode) around torch SGD; unlike "lars" it adapts every
    group and uses ||g|| + weight_decay * ||p|| as the trust-ratio denominator.
    """
    groups = lars_param_groups(model, lr_weights, lr_weights if lr_biases is None else lr_biases,
                               weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr_weights, momentum=momentum, eta=eta)
    if name == "apex_lars":
        try:
            from apex.parallel.LARC import LARC
        except ImportError:  # the unrelated PyPI package "apex" has no apex.parallel
            raise InputError("optimizer apex_lars: NVIDIA apex (apex.parallel.LARC) is not installed; "
                             "use lars.impl=native") from None
        return LARC(torch.optim.SGD(groups, lr=lr_weights, momentum=momentum), trust_coefficient=eta,
                    clip=False)
    raise InputError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def classifier_sgd(model: nn.Module, lr_backbone: float, lr_head: float, weight_decay: float,
                   momentum: float = 0.9, nesterov: bool = False) -> torch.optim.SGD:
    """SGD over a Classifier with its own learning rate for the backbone and for the head;
    weight decay only on weights (biases and norm parameters excluded)."""
    if nesterov and momentum <= 0:
        raise InputError(f"sgd.nesterov=true needs sgd.momentum > 0 (got {momentum})")
    groups = (lars_param_groups(model.backbone, lr_backbone, lr_backbone, weight_decay)
              + lars_param_groups(model.head, lr_head, lr_head, weight_decay))
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr_head, momentum=momentum,
                           nesterov=nesterov)
