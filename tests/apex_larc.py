"""A stand-in for NVIDIA apex's `apex.parallel.LARC` with exactly its public interface (apex is not on
PyPI, so the real one cannot be installed here): a wrapper, not a torch.optim.Optimizer, whose
zero_grad() and step() take no arguments. The arithmetic follows apex's scaling mode (clip=False)."""
import sys
import types

import torch


class LARC(object):
    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip

    def __getstate__(self):
        return self.optim.__getstate__()

    def __setstate__(self, state):
        self.optim.__setstate__(state)

    @property
    def state(self):
        return self.optim.state

    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optim.param_groups = value

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)

    def zero_grad(self):
        self.optim.zero_grad()

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)

    def step(self):
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                weight_decay = group.get("weight_decay", 0)
                weight_decays.append(weight_decay)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    param_norm, grad_norm = torch.norm(p.data), torch.norm(p.grad.data)
                    if param_norm != 0 and grad_norm != 0:
                        adaptive_lr = self.trust_coefficient * param_norm / (
                            grad_norm + param_norm * weight_decay + self.eps)
                        if self.clip:
                            adaptive_lr = min(adaptive_lr / group["lr"], 1)
                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr
        self.optim.step()
        for group, weight_decay in zip(self.optim.param_groups, weight_decays):
            group["weight_decay"] = weight_decay


def install(monkeypatch):
    """Make `from apex.parallel.LARC import LARC` find the stand-in for the rest of a test."""
    apex, parallel, module = (types.ModuleType(n) for n in ("apex", "apex.parallel", "apex.parallel.LARC"))
    module.LARC = LARC
    apex.parallel, parallel.LARC = parallel, module
    for name, mod in (("apex", apex), ("apex.parallel", parallel), ("apex.parallel.LARC", module)):
        monkeypatch.setitem(sys.modules, name, mod)
