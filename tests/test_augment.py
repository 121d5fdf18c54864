"""data.augment: the training views' augmentations a user controls (data.transforms.Augment), on the torch
backend; tests/test_dali.py holds the DALI twins' parity. The defaults are the recipe's to the bit: checked
against a copy of the builders as they were before the keys existed."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from data import transforms
from data.datasets import read_split
from data.loaders import build_loader
from data.transforms import Augment
from data.views import KINDS
from trainer.runtime import config
from trainer.runtime.loading import augment_of

torch.set_num_threads(1)

TRAINING_KINDS = [kind for kind, spec in KINDS.items() if spec.augmentations != ("evaluate",)]


def epochs_of_views(root, backend, kind, augment, epochs=4, image_size=32, seed=3):
    """Every view of `epochs` epochs of a `kind` loader over `root`: one (N, 3, size, size) tensor per view."""
    loader = build_loader(read_split(root, "labeled"), kind, image_size=image_size, global_batch=8, seed=seed,
                          workers=1 if backend == "dali" else 0, backend=backend, augment=augment)
    batches = [batch for epoch in range(epochs) for batch in loader.epoch(epoch)]
    return [torch.cat([batch["views"][i] for batch in batches]) for i in range(len(batches[0]["views"]))]


def pixels_of(views):
    """Normalised views -> 8-bit values (float), channel by channel."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))
    return (views * std + mean) * 255


def left_to_right_slopes(views):
    """Per view, the least-squares slope of its column means over the columns (cutout's exact zeros left out)."""
    kept = ~(views == 0).all(dim=1)                                   # N, H, W
    columns = (views.mean(dim=1) * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)   # N, W
    x = torch.arange(views.shape[-1], dtype=torch.float32)
    x = x - x.mean()
    return ((columns - columns.mean(dim=1, keepdim=True)) * x).sum(dim=1) / (x * x).sum()


def mirrored_fraction(root, backend, kind, augment):
    """The fraction of `kind`'s views of the ramps that darken left to right, i.e. were mirrored, among
    those that show a direction: DALI's contrast jitter, centred on mid-grey, may turn a dark ramp black."""
    slopes = torch.cat([left_to_right_slopes(view) for view in epochs_of_views(root, backend, kind, augment)])
    directed = slopes[slopes.abs() > 0.002]
    assert len(directed) >= 0.9 * len(slopes)
    return (directed < 0).float().mean().item()


def translations(views):
    """Per weak view of the grids (no flip), its (dx, dy) shift in px, read at the centre pixel."""
    centre = pixels_of(views)[:, :, 16, 16]
    return torch.round(centre[:, 0] / 8 - 16), torch.round(centre[:, 1] / 8 - 16)


def crop_areas(views):
    """Per train view of the grids (32 px, no flip), the fraction of the image its crop took: red rises 8
    levels per px of the image, so by 8 x width / 32 per px of the view; green likewise with the height."""
    values = pixels_of(views)[:, :, 4:-4, 4:-4]   # away from the resize's borders
    width = 4 * left_to_right_slopes(values[:, :1])
    height = 4 * left_to_right_slopes(values[:, 1:2].transpose(2, 3))
    return width * height / 32 ** 2


def cutout_sides(views):
    """Per strong view, the side (px) of its cutout square: sqrt of its pixels that are exactly 0."""
    return (views == 0).all(dim=1).flatten(1).sum(dim=1).float().sqrt()


# ---- flip ----

@pytest.mark.parametrize("kind", TRAINING_KINDS)
def test_flip_false_never_mirrors_a_training_view(ramps, kind):
    # RandAugment off in the strong view: its solarize may darken the bright side (no flip of its own)
    assert mirrored_fraction(ramps, "torch", kind, Augment(flip=False, rand_augment_ops=0)) == 0
    assert 0.25 < mirrored_fraction(ramps, "torch", kind, Augment(rand_augment_ops=0)) < 0.75


def test_flip_false_weak_view_is_never_its_mirror(ramps):
    """With no translation either, the weak view of an image is its evaluate view: never its mirror."""
    clean = next(build_loader(read_split(ramps, "labeled"), "eval", image_size=32, global_batch=8, workers=0,
                              shuffle=False, drop_last=False).epoch(0))["views"][0]
    loader = build_loader(read_split(ramps, "labeled"), "weak", image_size=32, global_batch=8, seed=3, workers=0,
                          shuffle=False, augment=Augment(flip=False, translate=0))
    for epoch in range(6):
        (view,) = next(loader.epoch(epoch))["views"]
        assert torch.equal(view, clean)
    flipping = build_loader(read_split(ramps, "labeled"), "weak", image_size=32, global_batch=8, seed=3, workers=0,
                            shuffle=False, augment=Augment(translate=0))
    mirrors = [torch.equal(view, clean[i].flip(-1)) for epoch in range(6)
               for i, view in enumerate(next(flipping.epoch(epoch))["views"][0])]
    assert 0.25 < np.mean(mirrors) < 0.75


def test_flip_false_leaves_no_flip_in_any_pipeline():
    for name, builder in transforms.AUGMENTATIONS.items():
        steps = builder(28, Augment(flip=False)).transforms
        assert not any(isinstance(step, v2.RandomHorizontalFlip) for step in steps), name
        with_flip = builder(28, Augment()).transforms
        assert any(isinstance(step, v2.RandomHorizontalFlip) for step in with_flip) == (name != "evaluate"), name


# ---- translate, crop_min_scale, RandAugment, cutout ----

def test_translate_shifts_the_weak_view_by_up_to_its_fraction(grids):
    for translate, pad in ((0.125, 4), (0.25, 8), (0.0, 0)):
        assert transforms.translate_padding(32, translate) == pad
        dx, dy = translations(epochs_of_views(grids, "torch", "weak", Augment(flip=False, translate=translate))[0])
        shifts = torch.cat([dx, dy]).abs()
        assert shifts.max() == pad
        if pad:   # uniform over -pad..pad: E|shift| = pad (pad + 1) / (2 pad + 1)
            assert abs(shifts.mean() - pad * (pad + 1) / (2 * pad + 1)) < 0.2 * pad
    assert transforms.translate_padding(8, 0.01) == 1   # at least a pixel unless off


def test_crop_min_scale_bounds_the_train_views_crop(grids):
    areas = {scale: crop_areas(epochs_of_views(grids, "torch", "train", Augment(flip=False, crop_min_scale=scale))[0])
             for scale in (0.25, 0.7)}
    for scale, area in areas.items():
        assert area.min() > scale - 0.05 and area.max() < 1.05, scale
    assert areas[0.7].mean() > areas[0.25].mean() + 0.15


def test_rand_augment_keys_set_the_ops_and_the_magnitudes_drawn():
    strong = transforms.strong(16, Augment(rand_augment_ops=3, rand_augment_magnitude=4))
    (chooser,) = [t for t in strong.transforms if isinstance(t, v2.RandomChoice)]
    assert [(t.num_ops, t.magnitude, t.num_magnitude_bins) for t in chooser.transforms] == \
        [(3, magnitude, 11) for magnitude in (1, 2, 3, 4)]   # magnitude 4 of 10: 40% of each op's range
    without = transforms.strong(16, Augment(rand_augment_ops=0)).transforms
    assert not any(isinstance(t, v2.RandomChoice) for t in without)


def test_cutout_sets_the_largest_square_and_zero_turns_it_off(grids):
    no_rand_augment = dict(flip=False, translate=0, rand_augment_ops=0)
    for cutout in (0.5, 0.25):
        weak, strong = epochs_of_views(grids, "torch", "weak_strong", Augment(cutout=cutout, **no_rand_augment))
        sides = cutout_sides(strong)
        assert sides.max() <= round(cutout * 32) and sides.min() >= round(0.08 ** 0.5 * cutout * 32)
        assert torch.equal(torch.where(strong == 0, 0, weak), strong)   # only the square changed
    weak, strong = epochs_of_views(grids, "torch", "weak_strong", Augment(cutout=0, **no_rand_augment))
    assert torch.equal(weak, strong)
    assert transforms.cutout_area(0.5) == (0.02, 0.25)   # the recipe's cutout: 2% to 25% of the image


# ---- the defaults are the recipe's, to the bit ----

# The builders as they were before data.augment (commit cd90cdd), verbatim but for names.
_OLD_TRAIN_MIN_SCALE = 0.25
_OLD_RAND_AUGMENT_OPS, _OLD_RAND_AUGMENT_MAX_MAGNITUDE = 2, 10
_OLD_CUTOUT_AREA = (0.02, 0.25)


def _old_translate_padding(size):
    return max(1, round(0.125 * size))


def _old_barlow_twins_view(size, blur_p, solarize_p):
    kernel = transforms.blur_kernel(size)
    return transforms._pipeline(
        [v2.RandomResizedCrop(size, scale=(transforms.barlow_twins_min_scale(size), 1.0),
                              interpolation=v2.InterpolationMode.BICUBIC),
         v2.RandomHorizontalFlip(),
         v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
         v2.RandomGrayscale(p=0.2)],
        [*transforms._with_probability(v2.GaussianBlur(kernel, sigma=(0.1, 2.0)), blur_p),
         *transforms._with_probability(v2.RandomSolarize(threshold=128, p=1.0), solarize_p)],
    )


def _old_train(size):
    return transforms._pipeline([v2.RandomResizedCrop(size, scale=(_OLD_TRAIN_MIN_SCALE, 1.0)),
                                 v2.RandomHorizontalFlip()])


def _old_flip_translate(size):
    return [*transforms._fit(size), v2.RandomHorizontalFlip(),
            v2.RandomCrop(size, padding=_old_translate_padding(size), padding_mode="reflect")]


def _old_weak(size):
    return transforms._pipeline(_old_flip_translate(size))


def _old_strong(size, num_ops=_OLD_RAND_AUGMENT_OPS, max_magnitude=_OLD_RAND_AUGMENT_MAX_MAGNITUDE):
    rand_augment = v2.RandomChoice([v2.RandAugment(num_ops, magnitude, num_magnitude_bins=max_magnitude + 1)
                                    for magnitude in range(1, max_magnitude + 1)])
    cutout = v2.RandomErasing(p=1.0, scale=_OLD_CUTOUT_AREA, ratio=(1.0, 1.0), value=0)
    return transforms._pipeline([*_old_flip_translate(size), rand_augment], after_normalise=[cutout])


OLD_AUGMENTATIONS = {
    "barlow_twins_blurred": lambda size: _old_barlow_twins_view(size, 1.0, 0.0),
    "barlow_twins_solarized": lambda size: _old_barlow_twins_view(size, 0.1, 0.2),
    "train": _old_train,
    "weak": _old_weak,
    "strong": _old_strong,
}


@pytest.mark.parametrize("name", sorted(OLD_AUGMENTATIONS))
def test_default_keys_give_the_views_of_before_to_the_bit(name):
    assert set(OLD_AUGMENTATIONS) | {"evaluate"} == set(transforms.AUGMENTATIONS)
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in
              [(28, 28, 3), (45, 30, 3), (30, 64, 3)]]
    for size in (28, 32):
        old, new = OLD_AUGMENTATIONS[name](size), transforms.AUGMENTATIONS[name](size, Augment())
        assert repr(new) == repr(old)
        for seed in range(12):
            for image in images:
                torch.manual_seed(seed)
                expected = old(image)
                torch.manual_seed(seed)
                assert torch.equal(new(image), expected), (name, size, seed)


def test_config_defaults_are_the_recipes():
    fields = {f.name: f.default for f in dataclasses.fields(config.AugmentConfig)}
    assert fields == dataclasses.asdict(Augment())
    required = {config.PretrainConfig: [], config.FinetuneConfig: ["finetune.backbone=random"],
                config.FixmatchConfig: ["fixmatch.model=m.pt"]}
    for cls, given in required.items():
        assert augment_of(config.load(cls, None, ["data.root=d", *given])) == Augment()
    cfg = config.load(config.FinetuneConfig, None, ["data.root=d", "finetune.backbone=random",
                                                    "data.augment.flip=false", "data.augment.cutout=0",
                                                    "data.augment.rand_augment_ops=1"])
    assert augment_of(cfg) == Augment(flip=False, cutout=0.0, rand_augment_ops=1)
