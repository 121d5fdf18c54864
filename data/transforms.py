"""torchvision augmentations: PIL RGB image -> float32 CHW tensor, ImageNet-normalised, size x size.

Every random draw goes through torch's global RNG, which ImageDataset seeds per sample.
Geometry and colour run on the PIL image (PIL's colour and RandAugment kernels are faster than
torchvision's tensor kernels on small CPU images: docs/results.md, loader), blur and solarize on uint8
tensors.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# augmentation parameters, shared with the DALI pipelines (data/dali.py)
TRAIN_MIN_SCALE = 0.25              # labels are scarce: keep most of the object
RAND_AUGMENT_OPS, RAND_AUGMENT_MAX_MAGNITUDE = 2, 10
CUTOUT_AREA = (0.02, 0.25)          # one square of up to half the side


def barlow_twins_min_scale(size):
    # 0.08 of the area at 224 px; small images keep larger crops (0.12 at 96 px, 0.23 at 28 px).
    return min(0.25, 0.08 * math.sqrt(224 / size))


def blur_kernel(size):
    # The paper's kernel is ~10% of the side (23 px at 224), kept odd and at least 3.
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def translate_padding(size):
    # Up to 12.5% translation, as FixMatch's weak augmentation.
    return max(1, round(0.125 * size))


class MultiView:
    """Applies one pipeline per view to the same image and returns the tuple of views."""

    def __init__(self, *pipelines):
        self.pipelines = pipelines

    def __call__(self, image):
        return tuple(pipeline(image) for pipeline in self.pipelines)


def _pipeline(pil_steps, tensor_steps=(), after_normalise=()):
    return v2.Compose([*pil_steps, v2.ToImage(), *tensor_steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), *after_normalise, v2.ToPureTensor()])


def _fit(size):
    # Shorter side to `size`, then trim the longer side: square images are resized, never cropped.
    return [v2.Resize(size), v2.CenterCrop(size)]


def _with_probability(transform, p):
    return [] if p <= 0 else [transform] if p >= 1 else [v2.RandomApply([transform], p=p)]


# Barlow Twins' asymmetric pair of views: blur always / solarize never, blur 10% / solarize 20%.
BARLOW_TWINS_PAIR = {"barlow_twins_blurred": {"blur_p": 1.0, "solarize_p": 0.0},
                     "barlow_twins_solarized": {"blur_p": 0.1, "solarize_p": 0.2}}


def _barlow_twins_view(size, blur_p, solarize_p):
    kernel = blur_kernel(size)
    return _pipeline(
        [v2.RandomResizedCrop(size, scale=(barlow_twins_min_scale(size), 1.0), interpolation=v2.InterpolationMode.BICUBIC),
         v2.RandomHorizontalFlip(),
         v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
         v2.RandomGrayscale(p=0.2)],
        [*_with_probability(v2.GaussianBlur(kernel, sigma=(0.1, 2.0)), blur_p),
         *_with_probability(v2.RandomSolarize(threshold=128, p=1.0), solarize_p)],
    )


def train(size):
    """Labeled fine-tuning: a mild random resized crop (labels are scarce; keep most of the object) + flip."""
    return _pipeline([v2.RandomResizedCrop(size, scale=(TRAIN_MIN_SCALE, 1.0)), v2.RandomHorizontalFlip()])


def _flip_translate(size):
    return [*_fit(size), v2.RandomHorizontalFlip(),
            v2.RandomCrop(size, padding=translate_padding(size), padding_mode="reflect")]


def weak(size):
    """FixMatch weak view: flip + small translation."""
    return _pipeline(_flip_translate(size))


def strong(size, num_ops=RAND_AUGMENT_OPS, max_magnitude=RAND_AUGMENT_MAX_MAGNITUDE):
    """FixMatch strong view: flip + translation, RandAugment at a random magnitude per sample, cutout."""
    # torchvision's RandAugment has one fixed magnitude; choosing among one instance per magnitude
    # (bins 0..max_magnitude span each op's full range) draws the magnitude per sample.
    rand_augment = v2.RandomChoice([v2.RandAugment(num_ops, magnitude, num_magnitude_bins=max_magnitude + 1)
                                    for magnitude in range(1, max_magnitude + 1)])
    # Cutout filled with the mean colour (0 after normalising).
    cutout = v2.RandomErasing(p=1.0, scale=CUTOUT_AREA, ratio=(1.0, 1.0), value=0)
    return _pipeline([*_flip_translate(size), rand_augment], after_normalise=[cutout])


def evaluate(size):
    """Deterministic evaluation view: shorter side resized to `size`, longer side centre-trimmed."""
    return _pipeline(_fit(size))


# data.views' augmentation names -> pipeline builders (size -> pipeline); data.dali holds their DALI twins.
AUGMENTATIONS = {
    **{name: partial(_barlow_twins_view, **probabilities) for name, probabilities in BARLOW_TWINS_PAIR.items()},
    "train": train,
    "weak": weak,
    "strong": strong,
    "evaluate": evaluate,
}


def multi_view(views) -> MultiView:
    """The pipelines of data.views.View `views` (augmentation, size), in order, over one image."""
    return MultiView(*(AUGMENTATIONS[view.augmentation](view.size) for view in views))
