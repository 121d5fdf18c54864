"""A classifier as a model that runs without semiscale: the module that goes into the exported graph
(ExportedClassifier: decoded images -> the evaluation preprocessing -> the network -> multi-scale TTA
probabilities), its TorchScript and ONNX files, the check of both files against semiscale's own
probabilities, and the README and export.json that describe an export (launch/export.py); the --out
folder (ExportFolder: what exports wrote there, proven by their manifest); and the checks of export.py's
command line: the TTA views (--scales or an eval.json), the input size.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from data import atomic
from data.datasets import load_image, read_split
from data.pillow_resize import ScaleView, fit_geometry, pixel_levels
from data.same_content import file_digest
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, evaluate
from trainer.runtime import engine
from trainer.algorithms.tta import scale_probabilities, tta_probabilities

FILES = ("model.ts", "model.onnx", "classes.txt", "README")   # in export.json's "files", with size and sha256
DESCRIPTION = "export.json"             # written last: a folder without it holds an unfinished export
PARTIAL = "export.partial.json"         # while an export writes: every version of FILES it may have left
OPSET = 17
TOLERANCE = 1e-4            # max |probability difference| the check accepts
CHECK_VAL_IMAGES = 32       # val images of the input size the check runs on,
CHECK_SCAN_IMAGES = 1000    # found among this many (sizes vary in some datasets)
CHECK_RANDOM_IMAGES = 4     # random-noise images for the check, which stress the resize's rounding


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


# ---- the command line ----

def chosen_views(scales: List[int] | None, mirror: bool, eval_json: str | None,
                 model: str) -> tuple[List[int], bool]:
    """The TTA scales and whether their mirrors: --scales and --mirror, or those of --scales-from's eval.json."""
    if mirror and eval_json:
        raise engine.StageError("--mirror: only with --scales (--scales-from takes eval.json's tta_mirror)")
    scales, mirror = (scales, mirror) if scales else scales_from(eval_json, model)
    bad = [s for s in scales if s < 1]
    if bad:
        raise engine.StageError(f"--scales {' '.join(map(str, scales))}: expected sizes >= 1 px, got {bad[0]}")
    return scales, mirror


def scales_from(path: str, model: str) -> tuple[List[int], bool]:
    """eval.json's tta_scales and tta_mirror (val's: evaluate scores every split with val's choice; an
    eval.json written before evaluate.mirror has no tta_mirror: no mirrors)."""
    try:
        result = engine.read_json(path)
    except OSError as e:
        raise engine.StageError(f"--scales-from {path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise engine.StageError(f"--scales-from {path}: not JSON ({e})") from None
    splits = result.get("splits") if isinstance(result, dict) else None
    split = (splits.get("val") or next(iter(splits.values()), None)) if isinstance(splits, dict) else None
    scales = split.get("tta_scales") if isinstance(split, dict) else None
    if not isinstance(scales, list) or not scales or not all(isinstance(s, int) for s in scales):
        raise engine.StageError(f"--scales-from {path}: expected the eval.json of a classifier evaluation "
                                "(splits.val.tta_scales), e.g. runs/demo/evaluate/eval.json")
    mirror = split.get("tta_mirror", False)
    if not isinstance(mirror, bool):
        raise engine.StageError(f"--scales-from {path}: tta_mirror: expected true or false, got {mirror!r}")
    scored = result.get("model")
    if isinstance(scored, str) and not _same_file(scored, model):
        print(f"export.py: warning: {path} scored {scored}, not {model}: its scales were chosen for that model",
              file=sys.stderr)
    return scales, mirror


def _same_file(one: str, two: str) -> bool:
    try:
        return os.path.samefile(one, two)
    except OSError:
        return os.path.abspath(one) == os.path.abspath(two)


def input_size(image_size: List[int] | None) -> tuple[int, int] | None:
    """--image-size H [W] as (H, W); None (the size of the dataset's first val image) when not given."""
    if image_size is None:
        return None
    if len(image_size) > 2 or min(image_size) < 1:
        raise engine.StageError(f"--image-size {' '.join(map(str, image_size))}: expected H [W], >= 1 px")
    return image_size[0], image_size[-1]


# ---- files ----

class ExportFolder:
    """--out, where an export replaces only what exports wrote: a file of FILES whose bytes are a version
    that export.json (a finished export) or export.partial.json (one killed while writing) records, and
    temporaries of theirs (data.atomic's names). Each new version is recorded before it takes its name, so
    that whatever a kill leaves is provably an export's and the next export goes on; anything else (a
    user's own README, an exported file they changed since, their *.tmp) is refused, and stays as it was."""

    def __init__(self, out: str):
        """Reads only: raises StageError unless `out` is new, empty or holds only what exports wrote."""
        self.out = out
        self.versions: dict[str, list[dict]] = {}   # name -> the records ({"size", "sha256"}) it may hold
        if os.path.exists(out) and not os.path.isdir(out):
            raise engine.StageError(f"--out {out}: not a folder")
        if not os.path.isdir(out):
            return
        recorded: dict[str, list[dict]] = {}
        for manifest in (DESCRIPTION, PARTIAL):
            if os.path.exists(self.path(manifest)):
                for name, records in self._read_manifest(manifest).items():
                    recorded.setdefault(name, []).extend(records)
        for name in sorted(os.listdir(out)):
            if name in (DESCRIPTION, PARTIAL) or self._temporary(name):
                continue
            if name not in recorded:
                raise engine.StageError(f"--out {out}: holds {name}, which no export wrote there ({DESCRIPTION} "
                                        "does not list it); choose a new or empty --out")
            record = _record(self.path(name)) if os.path.isfile(self.path(name)) else None
            if record not in recorded[name]:
                raise engine.StageError(f"--out {out}: {name} has changed since it was exported (its sha256 is "
                                        f"not the one {DESCRIPTION} records); move it away or choose a new or "
                                        "empty --out")
            self.versions[name] = [record]

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _read_manifest(self, name: str) -> dict[str, list[dict]]:
        """A manifest's "files": export.json's, a record per name; export.partial.json's, a list per name."""
        try:
            with open(self.path(name), encoding="utf-8") as f:
                files = json.load(f).get("files")
        except OSError as e:
            raise engine.StageError(f"--out {self.out}: cannot read {name} ({e.strerror})") from None
        except (ValueError, AttributeError):   # not JSON; JSON but not an object
            files = None
        if isinstance(files, dict) and set(files) <= set(FILES):
            files = {n: records if isinstance(records, list) else [records] for n, records in files.items()}
            if all(isinstance(r, dict) and set(r) == {"size", "sha256"} for rs in files.values() for r in rs):
                return files
        raise engine.StageError(f"--out {self.out}: holds {name}, which does not list the files an export wrote "
                                "there (an export made before semiscale recorded them, or not an export); choose "
                                "a new or empty --out")

    @staticmethod
    def _temporary(name: str) -> bool:
        return atomic.temporary_target(name) in FILES + (DESCRIPTION, PARTIAL)

    def start(self):
        """From here on --out holds no finished export: the records of the files there move from export.json
        to export.partial.json, and the temporaries a killed export left go."""
        try:
            os.makedirs(self.out, exist_ok=True)
            self._write_json(PARTIAL, {"files": self.versions})
            for name in os.listdir(self.out):
                if name == DESCRIPTION or self._temporary(name):
                    os.remove(self.path(name))
        except OSError as e:
            raise engine.StageError(f"--out {self.out}: cannot write there ({e.strerror})") from None

    def write(self, name: str, write):
        """write(a temporary path), recorded in export.partial.json, then renamed to `name` once on the disk
        (data.atomic): a reader sees the old file or the new one; a write the filesystem refuses is one line."""
        path = self.path(name)
        with atomic.refusing(path, engine.StageError), atomic.replacing(path, durable=True) as tmp:
            write(tmp)
            self.versions.setdefault(name, []).append(_record(tmp))
            self._write_json(PARTIAL, {"files": self.versions})   # before the rename: a kill leaves a recorded file

    def write_text(self, name: str, text: str):
        self.write(name, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))

    def finish(self, info: dict):
        """export.json, last: `info` and the files' sizes and sha256, by which the next export knows them."""
        self._write_json(DESCRIPTION, {**info, "files": {name: self.versions[name][-1] for name in FILES}})
        with atomic.refusing(self.path(PARTIAL), engine.StageError):
            os.remove(self.path(PARTIAL))

    def _write_json(self, name: str, obj):
        with atomic.refusing(self.path(name), engine.StageError), \
                atomic.writing(self.path(name), durable=True) as f:
            f.write(json.dumps(obj, indent=2) + "\n")


def _record(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": file_digest(path).hex()}


def to_torchscript(exported: ExportedClassifier) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch 2.14 marks TorchScript deprecated
        return torch.jit.script(exported)


def write_torchscript(scripted: torch.jit.ScriptModule, folder: ExportFolder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        folder.write("model.ts", lambda tmp: torch.jit.save(scripted, tmp))


def write_onnx(exported: ExportedClassifier, example: torch.Tensor, folder: ExportFolder):
    # The TorchScript-based exporter: the torch.export-based default needs onnxscript, which semiscale does
    # not install. It traces the module: the scale loop unrolls, N stays a dynamic axis.
    def write(tmp):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # its deprecation notice and tracer warnings
            torch.onnx.export(exported, (example,), tmp, dynamo=False, opset_version=OPSET, input_names=["images"],
                              output_names=["probabilities"],
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    folder.write("model.onnx", write)


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


def random_images(height: int, width: int) -> List[Image.Image]:
    """CHECK_RANDOM_IMAGES images of RGB noise, seeded: the same check on every export."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for _ in range(CHECK_RANDOM_IMAGES)]


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
  export.json  what was exported, the parity check, the files' sizes and sha256 (written last)

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
