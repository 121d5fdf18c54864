"""torchvision augmentations: PIL RGB image -> float32 CHW tensor, ImageNet-normalised, size x size.

Every random draw goes through torch's global RNG, which ImageDataset seeds per sample.
Geometry and colour run on the PIL image (PIL's colour and RandAugment kernels are faster than
torchvision's tensor kernels on small CPU images: docs/results.md, loader), blur and solarize on uint8
tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RandAugment's magnitude scale, shared with the DALI pipelines (data/dali.py): magnitude m is m / 10
# of each op's full range (torchvision's, bins 0..10).
RAND_AUGMENT_MAX_MAGNITUDE = 10
# A cutout square's area is drawn from this fraction of the largest square's area up to all of it:
# with Augment.cutout = 0.5, 2% to 25% of the image.
CUTOUT_MIN_AREA = 0.08


@dataclass(frozen=True)
class Augment:
    """What the training views' augmentations do: the config's data.augment (trainer.runtime.config.AugmentConfig
    declares the ranges), shared with the DALI pipelines (data/dali.py). The defaults are the recipe's."""
    flip: bool = True                   # horizontal flip, p=0.5, in every training view (all but evaluate)
    translate: float = 0.125            # weak and strong views: shift by up to this fraction of the side; 0 = none
    crop_min_scale: float = 0.25        # train view: the random resized crop keeps >= this fraction of the area
    rand_augment_ops: int = 2           # strong view: RandAugment ops per image; 0 = none
    rand_augment_magnitude: int = 10    # strong view: magnitude ~ U{1..this} per image (of RAND_AUGMENT_MAX_MAGNITUDE)
    cutout: float = 0.5                 # strong view: a square of side up to this fraction of the image; 0 = none


def cutout_area(cutout):
    """RandomErasing's `scale`: the range of a cutout square's area, as a fraction of the image's."""
    return (CUTOUT_MIN_AREA * cutout * cutout, cutout * cutout)


def barlow_twins_min_scale(size):
    # 0.08 of the area at 224 px; small images keep larger crops (0.12 at 96 px, 0.23 at 28 px).
    return min(0.25, 0.08 * math.sqrt(224 / size))


def blur_kernel(size):
    # The paper's kernel is ~10% of the side (23 px at 224), kept odd and at least 3.
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def translate_padding(size, translate=Augment.translate):
    # Up to 12.5% translation by default, as FixMatch's weak augmentation; at least 1 px unless 0.
    return max(1, round(translate * size)) if translate > 0 else 0


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


def _flip(augment):
    return [v2.RandomHorizontalFlip()] if augment.flip else []


def _barlow_twins_view(size, augment, blur_p, solarize_p):
    kernel = blur_kernel(size)
    return _pipeline(
        [v2.RandomResizedCrop(size, scale=(barlow_twins_min_scale(size), 1.0), interpolation=v2.InterpolationMode.BICUBIC),
         *_flip(augment),
         v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
         v2.RandomGrayscale(p=0.2)],
        [*_with_probability(v2.GaussianBlur(kernel, sigma=(0.1, 2.0)), blur_p),
         *_with_probability(v2.RandomSolarize(threshold=128, p=1.0), solarize_p)],
    )


def train(size, augment=Augment()):
    """Labeled fine-tuning: a mild random resized crop (labels are scarce; keep most of the object) + flip."""
    return _pipeline([v2.RandomResizedCrop(size, scale=(augment.crop_min_scale, 1.0)), *_flip(augment)])


def _flip_translate(size, augment):
    pad = translate_padding(size, augment.translate)
    return [*_fit(size), *_flip(augment),
            *([v2.RandomCrop(size, padding=pad, padding_mode="reflect")] if pad else [])]


def weak(size, augment=Augment()):
    """FixMatch weak view: flip + small translation."""
    return _pipeline(_flip_translate(size, augment))


def strong(size, augment=Augment()):
    """FixMatch strong view: flip + translation, RandAugment at a random magnitude per sample, cutout."""
    pil_steps = _flip_translate(size, augment)
    if augment.rand_augment_ops > 0:
        # torchvision's RandAugment has one fixed magnitude; choosing among one instance per magnitude
        # (bins 0..RAND_AUGMENT_MAX_MAGNITUDE span each op's full range) draws the magnitude per sample.
        pil_steps.append(v2.RandomChoice([
            v2.RandAugment(augment.rand_augment_ops, magnitude, num_magnitude_bins=RAND_AUGMENT_MAX_MAGNITUDE + 1)
            for magnitude in range(1, augment.rand_augment_magnitude + 1)]))
    # Cutout filled with the mean colour (0 after normalising).
    cutout = [v2.RandomErasing(p=1.0, scale=cutout_area(augment.cutout), ratio=(1.0, 1.0), value=0)
              ] if augment.cutout > 0 else []
    return _pipeline(pil_steps, after_normalise=cutout)


def evaluate(size, augment=None):
    """Deterministic evaluation view: shorter side resized to `size`, longer side centre-trimmed (`augment`
    is not used)."""
    return _pipeline(_fit(size))


# data.views' augmentation names -> pipeline builders (size, Augment -> pipeline); data.dali holds their DALI twins.
AUGMENTATIONS = {
    **{name: partial(_barlow_twins_view, **probabilities) for name, probabilities in BARLOW_TWINS_PAIR.items()},
    "train": train,
    "weak": weak,
    "strong": strong,
    "evaluate": evaluate,
}


def multi_view(views, augment: Augment = Augment()) -> MultiView:
    """The pipelines of data.views.View `views` (augmentation, size), in order, over one image."""
    return MultiView(*(AUGMENTATIONS[view.augmentation](view.size, augment) for view in views))
