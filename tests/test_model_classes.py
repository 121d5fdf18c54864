"""model.pt carries the names of the classes it tells apart (trainer/runtime/models.py): a dataset whose
classes.txt names other classes, even as many, is refused with one line naming the first that differs; a
model.pt saved before the names were kept still loads, checked on its class count alone."""
import logging

import pytest
import torch

from tiny import fashion, other_dataset, tiny_classifier, without_class_names
from data.datasets import read_classes
from trainer.runtime import checkpoint
from trainer.runtime.models import load_classifier


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    data = fashion(tmp_path_factory)
    path = tmp_path_factory.mktemp("model_classes") / "model.pt"
    tiny_classifier(data, path)
    return data, str(path)


def test_model_pt_records_the_class_names_as_plain_lists(model):
    data, path = model
    state = torch.load(path, weights_only=True)   # names as a list of str: no pickled objects to allow
    assert state["classes"] == read_classes(data) and state["arch"]["num_classes"] == 10
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert load_classifier(path, data)[1] == state["arch"]


def test_a_dataset_with_as_many_other_classes_is_refused(model, tmp_path):
    data, path = model
    names = read_classes(data)
    swapped = other_dataset(data, tmp_path / "swapped", names[:3] + [names[4], names[3]] + names[5:])
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_classifier(path, swapped)
    assert str(e.value) == (f"{path}: a model of other classes than {swapped}/classes.txt names: class 3 is 'Dress' in "
                            "the model, 'Coat' in classes.txt; label a dataset with a model trained on its classes")
    longer = other_dataset(data, tmp_path / "longer", names + ["Hat"])
    with pytest.raises(checkpoint.CheckpointError, match=r": class 10 is absent in the model, 'Hat' in classes.txt;"):
        load_classifier(path, longer)


def test_a_model_saved_without_class_names_is_checked_on_its_count(model, tmp_path, caplog):
    data, path = model
    old = without_class_names(path, tmp_path / "old.pt")
    renamed = other_dataset(data, tmp_path / "renamed", [f"kind{i}" for i in range(10)])
    with caplog.at_level(logging.WARNING):
        loaded, arch = load_classifier(old, renamed)   # nothing but the count to check: it matches
    assert caplog.messages == [f"{old} records no class names (saved by an older semiscale): only its class count "
                               f"(10) is checked against {renamed}/classes.txt"]
    assert arch["num_classes"] == 10
    for key, value in load_classifier(path, data)[0].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    fewer = other_dataset(data, tmp_path / "fewer", ["a", "b", "c"])
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_classifier(old, fewer)
    assert str(e.value) == f"{old}: a 10-class model, but {fewer}/classes.txt names 3 classes"


def test_class_names_that_do_not_fit_the_model_are_refused(model, tmp_path):
    data, path = model
    state = torch.load(path, weights_only=True)
    for bad in (state["classes"][:9], "T-shirt/top", [0] * 10):
        torch.save({**state, "classes": bad}, tmp_path / "bad.pt")
        with pytest.raises(checkpoint.CheckpointError, match=r"/bad.pt: not a semiscale model.pt \(classes: expected "
                                                             r"the 10 class names, got "):
            load_classifier(str(tmp_path / "bad.pt"), data)
