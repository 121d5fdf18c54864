"""Export a classifier (a model.pt) as a model that runs without semiscale: a TorchScript file and an ONNX
file that take decoded images and return class probabilities, with the evaluation preprocessing and the
multi-scale TTA inside the graph.

    python launch/export.py --model RUN/model.pt --data-root ROOT --out DIR --scales 28 32 [--mirror] \
        [--image-size H [W]]
    python launch/export.py --model RUN/model.pt --data-root ROOT --out DIR --scales-from EVAL_RUN/eval.json

Writes DIR/model.ts (TorchScript), DIR/model.onnx (ONNX, opset 17), DIR/classes.txt (ROOT's class names,
one a line, in index order), DIR/README (the contract below, and how to run both files) and, last,
DIR/export.json (what was exported, the parity check, and the other files' sizes and sha256): a folder
without export.json holds an unfinished export. Each file is written to a temporary name and renamed.
DIR must be new, empty or a previous export, finished or killed, whose files are as it wrote them: an
export replaces only files its export.json (or, while it writes, export.partial.json) records, byte for
byte; a folder holding anything else (a README of yours, an exported file you edited) is refused.

The exported model's input `images`: float32 N x 3 x H x W, RGB in [0, 1] (the 8-bit values / 255, as
torchvision's to_tensor gives them); N is free, H x W is fixed at export (--image-size; default: the size
of ROOT's first val image). Values are rounded to the nearest 1/255 inside. Decode images as semiscale
does (data.datasets.load_image): EXIF rotation applied, grey replicated to RGB, 16-bit grey >> 8,
transparent pixels composited on black. Output `probabilities`: float32 N x classes.
Inside the graph, for each TTA scale, data.transforms.evaluate(scale) is reproduced to the bit (Pillow's
bilinear resize of the shorter side to the scale, in Pillow's 8-bit fixed-point arithmetic and pass
order, read off the installed Pillow at export; the centre crop; / 255; ImageNet mean/std), then the
network and its softmax; with --mirror, each scale's view mirrored left-right (x.flip(-1)) as a view of
its own, after the scales' views; the output is the mean over the views (trainer.algorithms.tta). --scales-from takes
the scales, and whether their mirrors, that evaluate.py chose on val (eval.json's tta_scales, tta_mirror;
an eval.json without tta_mirror: no mirrors). The data.backend=dali views resize differently and are not
what the export reproduces.
The preprocessing module is data.pillow_resize; the exported module, its files, the check and the checks
of the options, trainer.operations.export.
Before export.json is written the export checks itself: both files, run on ROOT's val images of the input
size (up to 32) and on random images, against semiscale's own probabilities for the same images (the
model, data.transforms.evaluate, trainer.algorithms.tta's softmax and mean); a difference above 1e-4 stops it.
Bad input ends with one line `export.py: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from data.datasets import read_classes
from data.pillow_resize import build_views
from trainer.operations.export import (ExportedClassifier, ExportFolder, as_input, check_images, check_parity,
                                       chosen_views, describe, input_size, random_images, readme, to_torchscript,
                                       write_onnx, write_torchscript)
from trainer.runtime import engine
from trainer.runtime.models import load_classifier


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="export.py", description="Export a model.pt as TorchScript + ONNX with its evaluation "
        "preprocessing and multi-scale TTA inside: probabilities from images, without semiscale")
    parser.add_argument("--model", required=True, help="the model.pt (finetune, fixmatch, pipeline)")
    parser.add_argument("--data-root", required=True, help="its dataset: classes.txt, val images for the check")
    parser.add_argument("--out", required=True, help="the folder to write (new, empty, or a previous export)")
    scales = parser.add_mutually_exclusive_group(required=True)
    scales.add_argument("--scales", type=int, nargs="+", metavar="PX", help="TTA scales (shorter side, px)")
    scales.add_argument("--scales-from", metavar="EVAL_JSON",
                        help="evaluate.py's eval.json: the TTA scales (and mirrors or not) it chose on val")
    parser.add_argument("--mirror", action="store_true",
                        help="with --scales: also each scale's view mirrored left-right, as in evaluate.mirror")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                        help="the input's H [W] (default: the size of the dataset's first val image)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    classes = read_classes(args.data_root)
    scales, mirror = chosen_views(args.scales, args.mirror, args.scales_from, args.model)
    size = input_size(args.image_size)
    model, arch = load_classifier(args.model, args.data_root)
    model.eval()
    folder = ExportFolder(args.out)
    (height, width), val_images = check_images(args.data_root, size)

    noise = random_images(height, width)
    images = noise + val_images
    views, exact = build_views(scales, height, width, images)
    exported = ExportedClassifier(model, views, height, width, mirror).eval()
    for p in exported.parameters():
        p.requires_grad_(False)
    scripted = to_torchscript(exported)

    folder.start()   # from here on, the folder holds no complete export
    write_torchscript(scripted, folder)
    write_onnx(exported, as_input(noise[:2]), folder)
    folder.write_text("classes.txt", "".join(f"{name}\n" for name in classes))
    gaps = check_parity(folder.path("model.ts"), folder.path("model.onnx"), model, images, scales, mirror)
    info = describe(exported, exact, args.model, arch, classes, args.data_root, check={
        "images": len(images), "val_images": len(val_images), "random_images": len(noise),
        "torchscript_max_abs_diff": gaps["torchscript"], "onnx_max_abs_diff": gaps["onnx"]})
    folder.write_text("README", readme(info))
    folder.finish(info)
    print(f"[export] {args.out}: model.ts, model.onnx for {height}x{width} RGB input, TTA over {list(scales)} px"
          f"{' and their mirrors' if mirror else ''} ({time.time() - start:.1f} s); max |difference| from "
          f"semiscale's probabilities on {len(images)} images: TorchScript {gaps['torchscript']:.1e}, "
          f"ONNX {gaps['onnx']:.1e}")


if __name__ == "__main__":
    engine.cli(main)
