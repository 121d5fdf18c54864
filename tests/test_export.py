"""launch/export.py: the exported TorchScript and ONNX models, run in a process where semiscale cannot be
imported, give semiscale's own probabilities for the dataset's images."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import onnxruntime
import PIL
import pytest
import torch
import torch.nn.functional as F

from tiny import ENV, ROOT, fashion, other_dataset, stage, tiny_classifier, without_class_names
from data.datasets import load_image, read_classes, read_split
from data.pillow_resize import build_views
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, evaluate
from launch import export
from trainer.runtime import engine
from trainer.runtime.models import load_classifier
from trainer.algorithms.tta import scale_probabilities, tta_probabilities

SCALES = [28, 32, 22]   # the training size, up, down
MIRRORED_SCALES = [28, 22]

# Runs under `python -I -S`: no PYTHONPATH, no current folder, and no site-packages .pth files (the
# editable install of semiscale is one); torch, onnxruntime, Pillow and numpy come from the folders the
# test passes.
STANDALONE = r"""
import csv, sys
sys.path.extend(sys.argv[4:])
import numpy as np
import onnxruntime
import torch
from PIL import Image

def semiscale_importable():
    for name in ("trainer", "data", "launch"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        return name
    return None

assert not {"trainer", "data", "launch"} & set(sys.modules)
assert semiscale_importable() is None, semiscale_importable()
folder, root, out = sys.argv[1:4]
with open(root + "/test.csv", newline="") as f:
    paths = [row["path"] for row in csv.DictReader(f)]
pixels = np.stack([np.asarray(Image.open(root + "/" + p).convert("RGB")) for p in paths])   # N, H, W, 3 uint8
x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
model = torch.jit.load(folder + "/model.ts")
with torch.no_grad():
    torchscript = model(x).numpy()
session = onnxruntime.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
onnx = np.concatenate([session.run(None, {"images": x[i:i + 300].numpy()})[0] for i in range(0, len(x), 300)])
assert not [m for m in sys.modules if m.split(".")[0] in ("trainer", "data", "launch")]
np.savez(out, torchscript=torchscript, onnx=onnx)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model.pt whose predictions depend on the image and its scale (tests/tiny.py), exported with
    three TTA scales."""
    data = fashion(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("export")
    model = str(tmp / "model.pt")
    tiny_classifier(data, model)
    proc = stage("export", "--model", model, "--data-root", data, "--out", str(tmp / "export"),
                 "--scales", *map(str, SCALES))
    return data, model, tmp / "export", proc


@pytest.fixture(scope="module")
def exported_mirrored(exported, tmp_path_factory):
    """The same model.pt exported with two scales and their mirrors (evaluate.mirror's TTA)."""
    data, model, _, _ = exported
    out = tmp_path_factory.mktemp("export_mirrored") / "export"
    proc = stage("export", "--model", model, "--data-root", data, "--out", str(out),
                 "--scales", *map(str, MIRRORED_SCALES), "--mirror")
    return data, model, out, proc


def semiscale_probabilities(model_path, data, split, scales, mirrored=False):
    """What semiscale computes: the model.pt's classifier on data.transforms.evaluate views (and, mirrored,
    their horizontal mirrors after them), softmax, mean."""
    model = load_classifier(model_path, data)[0].eval()
    images = [load_image(p) for p in read_split(data, split).paths]
    with torch.no_grad():
        per_scale = scale_probabilities(model, [torch.stack([evaluate(s)(im) for im in images]) for s in scales],
                                        mirrored=mirrored)
    return model, images, per_scale, tta_probabilities(per_scale).numpy()


def standalone_probabilities(folder, data, tmp_path):
    """The exported files' probabilities for the test images, from a process that cannot import semiscale."""
    libraries = sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (torch, onnxruntime, PIL, np)})
    assert ROOT not in libraries
    out = tmp_path / "standalone.npz"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", STANDALONE, str(folder), data, str(out), *libraries],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


def test_exported_models_give_semiscales_probabilities_without_semiscale(exported, tmp_path):
    data, model, folder, _ = exported
    standalone = standalone_probabilities(folder, data, tmp_path)

    model, images, per_scale, expected = semiscale_probabilities(model, data, "test", SCALES)
    assert expected.shape == (800, 10)
    gaps = {k: float(np.abs(standalone[k] - expected).max()) for k in ("torchscript", "onnx")}
    print(f"max |probability difference| over 800 test images: {gaps}")
    assert gaps["torchscript"] <= 1e-4 and gaps["onnx"] <= 1e-4, gaps
    assert (standalone["onnx"].argmax(1) == expected.argmax(1)).all()
    # the check bites: the scales disagree on this model, and torch's own antialiased bilinear resize (not
    # Pillow's 8-bit arithmetic) misses semiscale's 32 px probabilities by far more than the tolerance
    assert (per_scale[1] - per_scale[0]).abs().max() > 0.1 and (per_scale[2] - per_scale[0]).abs().max() > 0.1
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    resized = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        assert (torch.softmax(model((resized - mean) / std), 1) - per_scale[1]).abs().max() > 1e-2


def test_mirrored_export_gives_semiscales_mirror_tta_probabilities_without_semiscale(exported_mirrored, tmp_path):
    data, model, folder, proc = exported_mirrored
    standalone = standalone_probabilities(folder, data, tmp_path)

    _, _, per_view, expected = semiscale_probabilities(model, data, "test", MIRRORED_SCALES, mirrored=True)
    assert per_view.shape == (4, 800, 10) and expected.shape == (800, 10)
    gaps = {k: float(np.abs(standalone[k] - expected).max()) for k in ("torchscript", "onnx")}
    print(f"max |probability difference| over 800 test images, mirrors on: {gaps}")
    assert gaps["torchscript"] <= 1e-4 and gaps["onnx"] <= 1e-4, gaps
    assert (standalone["onnx"].argmax(1) == expected.argmax(1)).all()
    # the check bites: the mirrors disagree with their views on this model, so an export that left them
    # out (the mean over the scales alone) would miss by far more than the tolerance
    assert (per_view[2] - per_view[0]).abs().max() > 0.1 and (per_view[3] - per_view[1]).abs().max() > 0.1
    assert np.abs(tta_probabilities(per_view[:2]).numpy() - expected).max() > 1e-2

    info = json.load(open(folder / "export.json"))
    assert info["scales"] == MIRRORED_SCALES and info["mirror"] is True
    assert info["preprocessing"]["mirror"] is True
    assert all(s["pixel_exact"] for s in info["preprocessing"]["scales"])
    assert "and their horizontal mirrors" in open(folder / "README").read()
    assert f"TTA over {MIRRORED_SCALES} px and their mirrors" in proc.stdout


def test_pillow_resize_reproduces_evaluate_to_the_bit():
    """data.pillow_resize's views against data.transforms.evaluate on random images that are not square:
    shrinking and enlarging, cropped along either axis."""
    rng = np.random.default_rng(1)
    for height, width in ((37, 23), (23, 37), (30, 30)):
        probes = [PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(3)]
        views, exact = build_views([16, 23, 50], height, width, probes)
        assert exact == [True, True, True], (height, width, exact)
        assert [v.size for v in views] == [16, 23, 50]


def test_folder_describes_the_export(exported):
    data, model, folder, proc = exported
    assert sorted(os.listdir(folder)) == ["README", "classes.txt", "export.json", "model.onnx", "model.ts"]
    with open(folder / "classes.txt") as f:
        assert f.read().splitlines() == read_classes(data)
    info = json.load(open(folder / "export.json"))
    assert info["scales"] == SCALES and info["model"] == os.path.abspath(model)
    assert info["mirror"] is False
    assert info["input"]["shape"] == ["N", 3, 28, 28] and info["output"]["shape"] == ["N", 10]
    assert all(s["pixel_exact"] for s in info["preprocessing"]["scales"])
    assert info["check"]["torchscript_max_abs_diff"] <= 1e-4 and info["check"]["onnx_max_abs_diff"] <= 1e-4
    assert "float32, N x 3 x 28 x 28" in open(folder / "README").read()
    assert proc.stdout.startswith(f"[export] {folder}: model.ts, model.onnx for 28x28 RGB input")


def test_scales_from_eval_json_and_a_second_export_replaces_the_first(exported, tmp_path):
    data, model, folder, _ = exported
    eval_json = tmp_path / "eval.json"   # launch/evaluate.py's layout (its docstring)
    eval_json.write_text(json.dumps({"model": model, "splits": {
        "val": {"images": 100, "tta": {"top1": 0.5, "top5": 0.9}, "tta_scales": [32, 22]},
        "test": {"images": 800, "tta": {"top1": 0.5, "top5": 0.9}, "tta_scales": [32, 22]}}}))
    out = tmp_path / "again"
    export.main(["--model", model, "--data-root", data, "--out", str(out), "--scales-from", str(eval_json),
                 "--image-size", "28"])
    info = json.load(open(out / "export.json"))
    assert info["scales"] == [32, 22] and info["input"]["shape"] == ["N", 3, 28, 28]
    assert info["mirror"] is False   # an eval.json from before evaluate.mirror: no tta_mirror, no mirrors
    export.main(["--model", model, "--data-root", data, "--out", str(out), "--scales", "28"])
    assert json.load(open(out / "export.json"))["scales"] == [28]
    assert sorted(os.listdir(out)) == ["README", "classes.txt", "export.json", "model.onnx", "model.ts"]
    # evaluate.mirror's eval.json: val chose the mirrors too (test, scored with val's choice, agrees)
    mirrored = tmp_path / "eval_mirrored.json"
    mirrored.write_text(json.dumps({"model": model, "splits": {
        "val": {"images": 100, "tta": {"top1": 0.5, "top5": 0.9}, "tta_scales": [22], "tta_mirror": True},
        "test": {"images": 800, "tta": {"top1": 0.5, "top5": 0.9}, "tta_scales": [22], "tta_mirror": True}}}))
    export.main(["--model", model, "--data-root", data, "--out", str(out), "--scales-from", str(mirrored)])
    info = json.load(open(out / "export.json"))
    assert info["scales"] == [22] and info["mirror"] is True


def test_a_missing_model_is_one_line_and_exit_status_2(tmp_path_factory, tmp_path):
    data = fashion(tmp_path_factory)
    missing = str(tmp_path / "nowhere" / "model.pt")
    proc = stage("export", "--model", missing, "--data-root", data, "--out", str(tmp_path / "out"),
                 "--scales", "28", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"export.py: error: {missing}: no such checkpoint"]
    assert not os.path.exists(tmp_path / "out")


def test_other_bad_input_is_refused_before_anything_is_written(exported, tmp_path):
    data, model, _, _ = exported
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    with pytest.raises(engine.StageError, match=r"^--out .*crowded: holds notes.txt, which no export wrote there"):
        export.main(["--model", model, "--data-root", data, "--out", str(crowded), "--scales", "28"])
    knn = tmp_path / "knn_eval.json"
    knn.write_text(json.dumps({"backbone": "b.pt", "k": 20, "knn": {"val": 0.5}}))
    with pytest.raises(engine.StageError, match=r"^--scales-from .*knn_eval.json: expected the eval.json of a "
                                                r"classifier evaluation"):
        export.main(["--model", model, "--data-root", data, "--out", str(tmp_path / "o"), "--scales-from", str(knn)])
    with pytest.raises(engine.StageError, match=r"^--scales 28 0: expected sizes >= 1 px, got 0$"):
        export.main(["--model", model, "--data-root", data, "--out", str(tmp_path / "o"), "--scales", "28", "0"])
    assert sorted(os.listdir(tmp_path)) == ["crowded", "knn_eval.json"]
    assert os.listdir(crowded) == ["notes.txt"]


def test_mirror_bad_input_is_refused_before_anything_is_written(exported, tmp_path):
    data, model, _, _ = exported
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"model": model, "splits": {"val": {"tta_scales": [28], "tta_mirror": "yes"}}}))
    with pytest.raises(engine.StageError, match=r"^--scales-from .*eval.json: tta_mirror: expected true or false, "
                                                r"got 'yes'$"):
        export.main(["--model", model, "--data-root", data, "--out", str(tmp_path / "o"), "--scales-from",
                     str(eval_json)])
    with pytest.raises(engine.StageError, match=r"^--mirror: only with --scales \(--scales-from takes eval.json's "
                                                r"tta_mirror\)$"):
        export.main(["--model", model, "--data-root", data, "--out", str(tmp_path / "o"), "--scales-from",
                     str(eval_json), "--mirror"])
    assert os.listdir(tmp_path) == ["eval.json"]


def test_a_model_of_another_datasets_classes_is_refused(exported, tmp_path):
    """As many classes under other names: the export's classes.txt would name its outputs wrongly."""
    data, model, _, _ = exported
    other = other_dataset(data, tmp_path / "other", [f"kind{i}" for i in range(10)])
    proc = stage("export", "--model", model, "--data-root", other, "--out", str(tmp_path / "out"), "--scales", "28",
                 check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"export.py: error: {model}: a model of other classes than {other}/classes.txt names: class 0 is "
        "'T-shirt/top' in the model, 'kind0' in classes.txt; label a dataset with a model trained on its classes"]
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_a_model_saved_without_class_names_still_exports(exported, tmp_path, caplog):
    data, model, _, _ = exported
    old = without_class_names(model, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING):
        export.main(["--model", old, "--data-root", data, "--out", str(tmp_path / "out"), "--scales", "28"])
    assert f"{old} records no class names (saved by an older semiscale)" in caplog.text
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines() == read_classes(data)
    info = json.load(open(tmp_path / "out" / "export.json"))
    assert info["check"]["torchscript_max_abs_diff"] <= 1e-4 and info["check"]["onnx_max_abs_diff"] <= 1e-4
