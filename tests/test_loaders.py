"""Datasets, transforms, the views of each loader kind, the sharded sampler and the torch Loader, on tiny
datasets written here."""
import ast
import importlib.util
import itertools
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from data import loaders, transforms
from data.datasets import BadImageError, ImageDataset, Split, load_image, read_classes, read_split
from data.loaders import BatchLoader, build_loader, resolve_backend
from data.sampler import ShardedSampler
from data.views import KINDS, views_of

torch.set_num_threads(1)


def write_dataset(root, num_images=12, size=16, num_classes=3, bad=()):
    """A dataset in the semiscale layout with random RGB PNGs; rows listed in `bad` hold garbage bytes."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "images", exist_ok=True)
    (root / "classes.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)))
    rows = []
    for i in range(num_images):
        path = root / "images" / f"{i:03d}.png"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        rows.append(f"images/{i:03d}.png,{i % num_classes}\n")
    for name in ("labeled", "val", "test", "unlabeled"):
        (root / f"{name}.csv").write_text("path,label\n" + "".join(rows))
    return root


@pytest.fixture
def root(tmp_path):
    return write_dataset(tmp_path)


# ---- load_image: every mode to RGB, bad files to BadImageError ----

def test_load_image_converts_every_mode_to_rgb(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200                      # red everywhere ...
    rgba[:4, :, 3] = 255                    # ... opaque in the top half, transparent below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    Image.fromarray((grey.astype(np.uint16) * 257)).save(tmp_path / "grey16.png")
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA").save(tmp_path / "la.png")

    images = {name: load_image(tmp_path / name) for name in os.listdir(tmp_path)}
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    for name, image in images.items():
        assert image.mode == "RGB" and image.size == (8, 8), name
    for name in ("grey.png", "palette.png", "grey16.png", "la.png"):
        np.testing.assert_array_equal(np.asarray(images[name]), np.repeat(grey[..., None], 3, axis=2), err_msg=name)
    rgb = np.asarray(images["rgba.png"])
    assert (rgb[:4] == [200, 0, 0]).all() and (rgb[4:] == 0).all()   # transparent pixels composite on black
    assert np.abs(np.asarray(images["cmyk.jpg"]).astype(int) - 90).max() <= 3


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"garbage bytes", "cannot decode"), (None, "truncated")])
def test_load_image_raises_bad_image_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:-300]
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as caught:
        load_image(path)
    assert str(path) in str(caught.value)
    with pytest.raises(BadImageError, match="not found"):
        load_image(tmp_path / "missing.png")


# ---- read_split / read_classes: validation with file:line ----

def test_read_split_reads_labels_and_hidden_labels(root):
    labeled = read_split(root, "labeled")
    assert labeled.paths[4] == os.path.join(str(root), "images", "004.png")
    assert labeled.labels.dtype == np.int64 and labeled.labels.tolist() == [i % 3 for i in range(12)]
    unlabeled = read_split(root, "unlabeled")
    assert unlabeled.labels is None and unlabeled.hidden_labels.tolist() == labeled.labels.tolist()
    (root / "unlabeled.csv").write_text("path\nimages/000.png\n")
    assert read_split(root, "unlabeled").hidden_labels is None
    custom = root.parent / "pseudo.csv"
    custom.write_text("path,label,confidence\nimages/001.png,2,0.9\n")
    split = read_split(root, str(custom))
    assert (split.name, split.labels.tolist()) == ("pseudo", [2])
    assert split.paths == [os.path.join(str(root), "images/001.png")]


@pytest.mark.parametrize("row, expected", [
    ("../outside.png,0", "inside"), ("/etc/passwd,0", "inside"), ("images/../../x.png,0", "inside"),
    ("images/000.png,3", r"\[0, 3\)"), ("images/000.png,-1", r"\[0, 3\)"), ("images/000.png,cat", "integer label"),
    ("images/000.png", "2 fields"),
])
def test_read_split_rejects_bad_rows_naming_file_and_line(root, row, expected):
    (root / "val.csv").write_text(f"path,label\nimages/001.png,1\n{row}\n")
    with pytest.raises(ValueError, match=expected) as caught:
        read_split(root, "val")
    assert f"{root / 'val.csv'}:3:" in str(caught.value)


def test_read_split_and_classes_reject_bad_headers_and_names(root):
    (root / "test.csv").write_text("path\nimages/000.png\n")
    with pytest.raises(ValueError, match=r"test.csv:1: expected a 'label' column"):
        read_split(root, "test")
    (root / "test.csv").write_text("file,label\n")
    with pytest.raises(ValueError, match=r"test.csv:1: expected a header starting with 'path'"):
        read_split(root, "test")
    with pytest.raises(ValueError, match="expected one of labeled"):
        read_split(root, "training")
    (root / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"classes.txt:3: class 'a' already named on line 1"):
        read_classes(root)


# ---- transforms ----

@pytest.mark.parametrize("size", [28, 32])
def test_every_transform_gives_normalised_float_views_of_the_exact_size(size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 30, 3), dtype=np.uint8))
    for kind in KINDS:
        kind_views = transforms.multi_view(views_of(kind, size))(image)
        assert len(kind_views) == {"barlow_twins": 2, "weak_strong": 2}.get(kind, 1)
        for view in kind_views:
            assert type(view) is torch.Tensor and view.dtype == torch.float32 and view.shape == (3, size, size), kind


def test_views_of_gives_each_kinds_views_in_batch_order():
    assert views_of("barlow_twins", 32) == [("barlow_twins_blurred", 32), ("barlow_twins_solarized", 32)]
    assert views_of("weak_strong", 32, scales=[16]) == [("weak", 32), ("strong", 32)]   # scales: eval's only
    assert views_of("eval", 32) == [("evaluate", 32)]
    assert views_of("eval", 32, scales=[28, 36]) == [("evaluate", 28), ("evaluate", 36)]
    with pytest.raises(ValueError, match="loader kind 'bogus': expected one of barlow_twins, train, weak, "
                                         "weak_strong, eval"):
        views_of("bogus", 32)


def test_every_augmentation_a_kind_names_has_a_torchvision_pipeline():
    named = {augmentation for kind in KINDS.values() for augmentation in kind.augmentations}
    assert named == set(transforms.AUGMENTATIONS)


def test_data_modules_import_one_way():
    """loaders -> dali (lazily) -> sampler, views, transforms, datasets: the backends share the contract
    modules and never import each other's module; nothing in data/ imports trainer/. errors and atomic are
    everyone's."""
    data_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    imported = {}
    for name in os.listdir(data_dir):
        if name.endswith(".py"):
            with open(os.path.join(data_dir, name)) as f:
                tree = ast.parse(f.read())
            imported[name[:-3]] = {alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                                   for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                                   for alias in node.names}
    assert not {module for names in imported.values() for module in names if module.startswith("trainer")}
    data_imports = {module: {n.split(".")[1] for n in names if n.startswith("data.")}
                    for module, names in imported.items()}
    assert data_imports["dali"] - {"errors", "atomic"} == {"datasets", "sampler", "transforms", "views"}
    assert data_imports["loaders"] - {"errors", "atomic"} == {"dali", "datasets", "sampler", "transforms", "views"}
    assert not data_imports["errors"] and not data_imports["atomic"]   # they import nothing of data/
    for contract in ("sampler", "views", "transforms", "datasets"):
        assert not data_imports[contract] & {"loaders", "dali"}, contract


def test_evaluate_on_a_square_image_is_plain_normalisation():
    pixels = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    mean, std = (torch.tensor(v)[:, None, None] for v in (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(transforms.evaluate(20)(Image.fromarray(pixels)), expected)


def test_barlow_twins_views_are_random_and_differ():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    barlow_twins = transforms.multi_view(views_of("barlow_twins", 32))
    first = barlow_twins(image)
    second = barlow_twins(image)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], second[0])


def test_strong_draws_its_randaugment_magnitude_per_sample():
    strong = transforms.strong(16)
    chooser = next(t for t in strong.transforms if isinstance(t, v2.RandomChoice))
    assert sorted(t.magnitude for t in chooser.transforms) == list(range(1, 11))
    picked = []
    for rand_augment in chooser.transforms:
        rand_augment.register_forward_pre_hook(lambda module, inputs: picked.append(module.magnitude))
    image = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    torch.manual_seed(0)
    for _ in range(30):
        strong(image)
    assert len(picked) == 30 and len(set(picked)) >= 5


# ---- the dataset: per-sample seeding and bad images ----

def test_items_depend_only_on_seed_epoch_and_index(root):
    dataset = ImageDataset(read_split(root, "labeled"), transforms.multi_view(views_of("barlow_twins", 16)), seed=3)
    global_rng = torch.get_rng_state()
    forward = [dataset[i] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), global_rng)       # the caller's RNG is left alone
    backward = [dataset[i] for i in reversed(range(4))][::-1]
    for (views_a, label_a, index_a), (views_b, label_b, index_b) in zip(forward, backward):
        assert (label_a, index_a) == (label_b, index_b)
        assert all(torch.equal(a, b) for a, b in zip(views_a, views_b))
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0][0], forward[0][0][0])


def test_on_bad_image_error_names_the_file(tmp_path):
    root = write_dataset(tmp_path, bad={2})
    dataset = ImageDataset(read_split(root, "labeled"), transforms.MultiView(transforms.evaluate(16)))
    with pytest.raises(BadImageError, match="002.png"):
        dataset[2]
    loader = build_loader(read_split(root, "labeled"), "eval", image_size=16, global_batch=4, shuffle=False,
                          drop_last=False, workers=1)
    with pytest.raises(Exception, match="002.png"):
        list(loader.epoch(0))


def test_on_bad_image_skip_substitutes_the_next_decodable_row_and_warns_once(tmp_path, caplog):
    root = write_dataset(tmp_path, bad={2, 3, 11})
    split = read_split(root, "labeled")
    dataset = ImageDataset(split, transforms.MultiView(transforms.evaluate(16)), on_bad_image="skip")
    clean = ImageDataset(split, transforms.MultiView(transforms.evaluate(16)))
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        views, label, index = dataset[2]
        assert (label, index) == (split.labels[4], 4) and torch.equal(views[0], clean[4][0][0])
        assert dataset[3][2] == 4 and dataset[11][2] == 0     # wraps around the end
        dataset[2]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and sum("002.png" in m for m in warned) == 1
    assert dataset.bad_images == {split.paths[2], split.paths[3], split.paths[11]}


# ---- the sampler ----

def rank_batches(world, n=23, batch=6, epoch=0, start_step=0, **kwargs):
    samplers = [ShardedSampler(n, batch, rank=r, world=world, **kwargs) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch, start_step)
    assert len({s.steps_per_epoch for s in samplers}) == 1
    return [list(s) for s in samplers]


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_together_see_what_one_rank_sees(drop_last):
    one = rank_batches(1, seed=5, drop_last=drop_last)[0]
    two = rank_batches(2, seed=5, drop_last=drop_last)
    assert len(two[0]) == len(two[1]) == len(one) == (3 if drop_last else 4)
    for step, batch in enumerate(one):
        assert two[0][step] + two[1][step] == batch
        assert not set(two[0][step]) & set(two[1][step])
    seen = [i for batch in one for i in batch]
    assert len(seen) == len(set(seen)) == (18 if drop_last else 23)
    assert rank_batches(1, seed=5, epoch=1)[0] != one            # a new permutation each epoch


def test_eval_sharding_sees_every_index_once_with_equal_steps():
    ranks = rank_batches(3, n=20, batch=6, shuffle=False, drop_last=False)
    assert [len(batches) for batches in ranks] == [4, 4, 4]    # blocks of 6, 7, 7 rows in batches of 2
    flat = [i for batches in ranks for batch in batches for i in batch]
    assert flat == list(range(20))                              # contiguous blocks, in rank order
    assert ranks[0][-1] == [] and ranks[1][-1] == [12]          # short blocks end with empty or short batches


def test_resuming_mid_epoch_continues_the_uninterrupted_order():
    full = rank_batches(2, seed=1, epoch=4)
    resumed = rank_batches(2, seed=1, epoch=4, start_step=2)
    assert [batches[2:] for batches in full] == resumed


def test_sampler_rejects_a_batch_that_does_not_split_across_ranks():
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        ShardedSampler(10, 6, rank=0, world=4)


# ---- the Loader ----

def collect(loader, epoch=0, start_step=0):
    return list(loader.epoch(epoch, start_step))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["label"], y["label"])
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))


def test_two_ranks_produce_the_one_rank_batches_exactly(root):
    split = read_split(root, "unlabeled")
    options = dict(image_size=16, global_batch=4, seed=7, workers=0)
    one = collect(build_loader(split, "barlow_twins", **options), epoch=1)
    two = [collect(build_loader(split, "barlow_twins", rank=r, world=2, **options), epoch=1) for r in range(2)]
    assert len(one) == 3
    merged = [{"index": torch.cat([a["index"], b["index"]]), "label": torch.cat([a["label"], b["label"]]),
               "views": [torch.cat(pair) for pair in zip(a["views"], b["views"])]} for a, b in zip(*two)]
    assert_same_batches(one, merged)
    batch = one[0]
    assert [tuple(v.shape) for v in batch["views"]] == [(4, 3, 16, 16)] * 2
    assert batch["label"].tolist() == [-1] * 4 and batch["index"].dtype == torch.int64


def test_worker_processes_and_resuming_do_not_change_the_batches(root):
    split = read_split(root, "labeled")
    options = dict(image_size=16, global_batch=4, seed=2)
    in_process = collect(build_loader(split, "weak_strong", workers=0, **options), epoch=3)
    with_workers = build_loader(split, "weak_strong", workers=2, **options)
    assert_same_batches(in_process, collect(with_workers, epoch=3))
    assert_same_batches(in_process[1:], collect(with_workers, epoch=3, start_step=1))
    assert in_process[0]["label"].tolist() == [split.labels[i] for i in in_process[0]["index"].tolist()]


def test_stream_continues_epoch_after_epoch_from_any_step(root):
    loader = build_loader(read_split(root, "labeled"), "weak_strong", image_size=16, global_batch=4, seed=2,
                          workers=0)
    assert loader.steps_per_epoch == 3
    successive = [batch for epoch in range(4) for batch in collect(loader, epoch)]
    for start in (0, 4):   # an epoch start, and mid-epoch (epoch 1, step 1)
        assert_same_batches(list(itertools.islice(loader.stream(start), 12 - start)), successive[start:])


def test_stream_is_for_drop_last_loaders(root):
    loader = build_loader(read_split(root, "test"), "eval", image_size=16, global_batch=4, shuffle=False,
                          drop_last=False, workers=0)
    with pytest.raises(ValueError, match=r"stream\(\) needs a training loader \(drop_last=True\)"):
        loader.stream(0)


def test_pins_memory_only_for_a_cuda_device(root):
    split = read_split(root, "labeled")
    for device, pinned in (("cpu", False), (torch.device("cpu"), False), ("cuda", True), ("cuda:1", True)):
        loader = build_loader(split, "train", image_size=16, global_batch=4, workers=0, device=device)
        assert loader._loader.pin_memory is pinned, device


def test_eval_loader_gives_one_view_per_scale_and_empty_final_batches(root):
    split = read_split(root, "test")
    shards = [build_loader(split, "eval", image_size=16, global_batch=10, rank=r, world=2, shuffle=False,
                           drop_last=False, workers=0, scales=[16, 24]) for r in range(2)]
    assert [s.steps_per_epoch for s in shards] == [2, 2]
    batches = [collect(s) for s in shards]
    assert [len(b["index"]) for shard in batches for b in shard] == [5, 1, 5, 1]
    indices = torch.cat([b["index"] for shard in batches for b in shard]).tolist()
    assert indices == list(range(12))
    assert [tuple(v.shape) for v in batches[0][0]["views"]] == [(5, 3, 16, 16), (5, 3, 24, 24)]
    empty = loaders.Collate(views_of("eval", 16, [16, 24]))([])
    assert [tuple(v.shape) for v in empty["views"]] == [(0, 3, 16, 16), (0, 3, 24, 24)] and len(empty["label"]) == 0


def test_build_loader_rejects_a_split_smaller_than_one_batch(root):
    with pytest.raises(ValueError, match="12 rows: not enough for one step of global batch 16 with drop_last"):
        build_loader(read_split(root, "labeled"), "train", image_size=16, global_batch=16)
    with pytest.raises(ValueError, match="loader kind 'bogus'"):
        build_loader(read_split(root, "labeled"), "bogus", image_size=16, global_batch=4)


def test_resolve_backend():
    assert resolve_backend("torch") == "torch"
    dali_imports = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali")
    assert resolve_backend("auto") == ("dali" if dali_imports else "torch")
    with pytest.raises(ValueError, match="expected one of auto, dali, torch"):
        resolve_backend("tensorflow")


def test_torch_loader_is_a_batch_loader(root):
    assert isinstance(build_loader(read_split(root, "labeled"), "train", image_size=16, global_batch=4, workers=0),
                      BatchLoader)


def test_dali_backend_delegates_to_dali_loader(root, monkeypatch):
    calls = []
    fake = types.ModuleType("data.dali")
    fake.DaliLoader = lambda split, kind, **kwargs: calls.append((split, kind, kwargs)) or "dali loader"
    monkeypatch.setitem(sys.modules, "data.dali", fake)
    monkeypatch.setattr(loaders, "resolve_backend", lambda name: "dali")
    split = read_split(root, "labeled")
    scanned = {split.paths[0]: {"bad": "empty file"}}
    augment = transforms.Augment(flip=False, cutout=0.25)
    loader = build_loader(split, "train", image_size=16, global_batch=4, backend="dali", world=2, rank=1,
                          device="cuda:1", scanned=scanned, augment=augment)
    assert loader == "dali loader"
    assert calls == [(split, "train", dict(image_size=16, global_batch=4, rank=1, world=2, seed=0, shuffle=True,
                                           drop_last=True, workers=2, on_bad_image="error", scales=None,
                                           device=torch.device("cuda", 1), scanned=scanned, augment=augment))]


def test_split_is_the_contract_dataclass():
    split = Split(root="/r", name="val", paths=["/r/a.png"], labels=np.array([1]), hidden_labels=None)
    assert len(split) == 1
