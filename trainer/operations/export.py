"""A classifier as a model that runs without semiscale: the module that goes into the exported graph
(ExportedClassifier: decoded images -> the evaluation preprocessing -> the network -> multi-scale TTA
probabilities), its TorchScript and ONNX files, the check of both files against semiscale's own
probabilities, and the README and export.json that describe an export (launch/export.py).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import List

import torch
import torch.nn as nn
from PIL import Image

from data.datasets import load_image, read_split
from data.pillow_resize import ScaleView, fit_geometry, pixel_levels
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, evaluate
from trainer.runtime import engine
from trainer.algorithms.tta import scale_probabilities, tta_probabilities

OPSET = 17
TOLERANCE = 1e-4            # max |probability difference| the check accepts
CHECK_VAL_IMAGES = 32       # val images of the input size the check runs on,
CHECK_SCAN_IMAGES = 1000    # found among this many (sizes vary in some datasets)


def _check_input(images: torch.Tensor, height: int, width: int):
    if images.dtype != torch.float32:
        raise ValueError("expected float32 images: RGB in [0, 1] (the 8-bit values / 255)")
    if images.dim() != 4 or images.size(1) != 3 or images.size(2) != height or images.size(3) != width:
        raise ValueError("expected images of shape N x 3 x " + str(height) + " x " + str(width) + " (RGB), got "
                         + str([int(d) for d in images.shape]))


class ExportedClassifier(nn.Module):
    """images (N, 3, H, W) float32 RGB in [0, 1] -> (N, classes) probabilities: the mean of the classifier's
    softmax over the scales' views and, when `mirror`, their horizontal mirrors after them
    (trainer.algorithms.tta.scale_probabilities, tta_probabilities)."""

    def __init__(self, model: nn.Module, views: List[ScaleView], height: int, width: int, mirror: bool = False):
        super().__init__()
        self.model = model
        self.views = nn.ModuleList(views)
        self.height, self.width = height, width
        self.mirror = mirror

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():   # the ONNX graph's declared input shape checks it there
            _check_input(images, self.height, self.width)
        levels = torch.round(images.clamp(0.0, 1.0) * 255.0).double()
        per_view: List[torch.Tensor] = []
        mirrored: List[torch.Tensor] = []
        for view in self.views:
            x = view(levels)
            per_view.append(torch.softmax(self.model(x).float(), 1))
            if self.mirror:
                mirrored.append(torch.softmax(self.model(x.flip(-1)).float(), 1))
        return torch.stack(per_view + mirrored).mean(0)


def as_input(images: List[Image.Image]) -> torch.Tensor:
    """Decoded RGB images -> the exported model's input (what the README tells a user to do)."""
    return pixel_levels(images).float() / 255


# ---- files ----

def clear_previous(out: str):
    """A previous export's export.json (it is no longer complete) and stray temporaries."""
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name == "export.json" or name.endswith(".tmp"):
                os.remove(os.path.join(out, name))
    except OSError as e:
        raise engine.StageError(f"--out {out}: cannot write there ({e.strerror})") from None


def write_atomic(path: str, write):
    """write(temporary path) then fsync and rename over `path`: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would keep an export from the people it is for
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise engine.StageError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def to_torchscript(exported: ExportedClassifier) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch 2.14 marks TorchScript deprecated
        return torch.jit.script(exported)


def write_torchscript(scripted: torch.jit.ScriptModule, path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        write_atomic(path, lambda tmp: torch.jit.save(scripted, tmp))


def write_onnx(exported: ExportedClassifier, example: torch.Tensor, path: str):
    # The TorchScript-based exporter: the torch.export-based default needs onnxscript, which semiscale does
    # not install. It traces the module: the scale loop unrolls, N stays a dynamic axis.
    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # its deprecation notice and tracer warnings
            torch.onnx.export(exported, (example,), tmp, dynamo=False, opset_version=OPSET, input_names=["images"],
                              output_names=["probabilities"],
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    write_atomic(path, write)


# ---- the check ----

def check_images(root: str, size: tuple[int, int] | None) -> tuple[tuple[int, int], List[Image.Image]]:
    """(input H, W; val images of that size among the first CHECK_SCAN_IMAGES, up to CHECK_VAL_IMAGES, decoded
    as semiscale decodes them)."""
    val = read_split(root, "val")
    if not val.paths:
        raise engine.StageError(f"{root}/val.csv: no images (the export checks itself on them)")
    found, height_width = [], size
    for path in val.paths[:CHECK_SCAN_IMAGES]:
        image = load_image(path)
        if height_width is None:
            height_width = (image.height, image.width)
        if (image.height, image.width) == height_width:
            found.append(image)
            if len(found) == CHECK_VAL_IMAGES:
                break
    return height_width, found


def semiscale_probabilities(model: nn.Module, images: List[Image.Image], scales: List[int],
                            mirror: bool) -> torch.Tensor:
    """What semiscale computes for the images: data.transforms.evaluate views, the model's softmax, the mean."""
    with torch.no_grad():
        views = [torch.stack([evaluate(s)(im) for im in images]) for s in scales]
        return tta_probabilities(scale_probabilities(model, views, mirrored=mirror))


def check_parity(torchscript_path: str, onnx_path: str, model: nn.Module, images: List[Image.Image],
                 scales: List[int], mirror: bool) -> dict:
    """Max |probability difference| of the written files, loaded back, from semiscale's own probabilities
    for the images ({"torchscript", "onnx"}); above TOLERANCE is a bug, and raises."""
    import onnxruntime
    x = as_input(images)
    expected = semiscale_probabilities(model, images, scales, mirror)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torchscript = torch.jit.load(torchscript_path)(x)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    gaps = {"torchscript": (torchscript - expected).abs().max().item(), "onnx": (onnx - expected).abs().max().item()}
    if max(gaps.values()) > TOLERANCE:
        raise RuntimeError(f"the exported model differs from semiscale by up to {max(gaps.values()):.2e} "
                           f"(TorchScript {gaps['torchscript']:.2e}, ONNX {gaps['onnx']:.2e}): a bug in export.py")
    return gaps


# ---- description ----

def describe(exported: ExportedClassifier, exact: List[bool], model: str, arch: dict, classes: List[str],
             data_root: str, check: dict) -> dict:
    """export.json: what was exported (`exact`: whether each view is pixel-exact on the probe images) and
    the parity check (`check`: the gaps and image counts)."""
    import onnxruntime
    h, w = exported.height, exported.width
    scales = [view.size for view in exported.views]
    return {
        "model": os.path.abspath(model), "arch": arch, "num_classes": len(classes),
        "data_root": os.path.abspath(data_root), "scales": scales, "mirror": exported.mirror,
        "input": {"name": "images", "dtype": "float32", "shape": ["N", 3, h, w], "channels": "RGB",
                  "range": [0.0, 1.0], "meaning": "8-bit pixel values / 255, decoded as data.datasets.load_image"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(classes)],
                   "meaning": "mean over the scales" + (" and their mirrors" if exported.mirror else "")
                   + " of the softmax; column i is line i of classes.txt"},
        "preprocessing": {"scales": [{"scale": v.size, "resize_to": list(fit_geometry(h, w, v.size)[:2]),
                                      "crop_top_left": list(fit_geometry(h, w, v.size)[2:]),
                                      "vertical_pass_first": v.vertical_first, "pixel_exact": e}
                                     for v, e in zip(exported.views, exact)],
                          "mirror": exported.mirror, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "check": {**check, "tolerance": TOLERANCE},
        "onnx_opset": OPSET,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "pillow": Image.__version__},
    }


def readme(info: dict) -> str:
    h, w = info["input"]["shape"][2:]
    mirrors = " and their horizontal mirrors" if info["mirror"] else ""
    mirror = (";\nand, as a view of its own, each scale's view mirrored left-right" if info["mirror"] else "")
    return f"""Classifier exported by semiscale's launch/export.py from {info['model']}
({info['arch']['backbone']}, {info['num_classes']} classes; TTA over {info['scales']} px{mirrors}).

Files
  model.ts     TorchScript (torch.jit.load; needs torch only)
  model.onnx   ONNX opset {OPSET} (onnxruntime)
  classes.txt  class names, one a line: line i is the name of output column i
  export.json  what was exported and the parity check (written last)

Input `images`: float32, N x 3 x {h} x {w}, RGB, values in [0, 1] = the 8-bit pixel values / 255
(values are rounded to the nearest 1/255 inside). N is free; H x W is fixed. For images of another
size, export again with --image-size: resizing them to {h} x {w} first is not what semiscale does,
and the probabilities would then differ from its own.
Decode as semiscale does (data.datasets.load_image): apply the EXIF rotation, grey -> RGB by
repeating the channel, 16-bit grey >> 8, transparent pixels composited on black; e.g. with Pillow
  image = PIL.ImageOps.exif_transpose(PIL.Image.open(path)).convert("RGB")   # 8-bit grey or RGB
  x = torch.from_numpy(numpy.asarray(image)).permute(2, 0, 1).float()[None] / 255

Output `probabilities`: float32, N x {info['num_classes']}, each row sums to 1: the mean over the scales
{info['scales']}{mirrors} of the network's softmax. Inside: for each scale, the shorter side resized to the scale
(Pillow's bilinear, antialiased, bit-exact), the centre square crop, ImageNet mean/std normalisation{mirror}.

  import torch
  model = torch.jit.load("model.ts")
  probabilities = model(x)

  import onnxruntime
  session = onnxruntime.InferenceSession("model.onnx")
  probabilities = session.run(None, {{"images": x.numpy()}})[0]

Parity with semiscale on {info['check']['images']} images: max |difference| TorchScript
{info['check']['torchscript_max_abs_diff']:.2e}, ONNX Runtime {info['check']['onnx_max_abs_diff']:.2e}.
"""
