"""train.precision=auto: a measured choice between fp32 and bf16 on the CPU, leaving the model untouched."""
import torch

from trainer.runtime import amp
from trainer.dist import Runtime
from trainer.runtime.models import Classifier, build_backbone


def test_auto_measures_both_and_takes_the_faster_without_touching_the_model():
    torch.manual_seed(0)
    model = Classifier(build_backbone("small", width=8), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen, measured = amp.resolve_precision("auto", model, (4, 3, 16, 16), Runtime())
    assert set(measured) == {"fp32", "bf16"} and all(s > 0 for s in measured.values())
    assert chosen == min(measured, key=measured.get)
    for k, v in model.state_dict().items():   # weights and BatchNorm statistics as they were
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert amp.describe_precision(chosen, measured).startswith(f"precision auto -> {chosen} (fp32 ")


def test_a_given_precision_is_kept_unmeasured():
    model = Classifier(build_backbone("small", width=8), 3)
    assert amp.resolve_precision("bf16", model, (4, 3, 16, 16), Runtime()) == ("bf16", {})
    assert amp.describe_precision("fp32", {}) == "precision fp32"
