"""NVIDIA DALI twins of data.transforms' pipelines, behind data.loaders' BatchLoader interface.

The caller names the torch device the training runs on: a CUDA device gets `mixed` (nvJPEG) decode
and GPU ops on it, views come out as CUDA tensors there; any other device gets CPU decode and ops, CPU
tensors.

A pipeline reads a file list of this rank's rows in the exact order data.sampler.ShardedSampler gives,
with DALI's own shuffling off: sharding, epoch length and resume are those of the torch path. epoch()
runs a fresh pipeline per call; stream() runs one per chunk of whole epochs of at least
STREAM_MIN_STEPS steps, so a small labeled loader cycled epoch after epoch does not rebuild one (nvJPEG
state, thread pool, cold prefetch) every few steps. Each graph is traced once per process, then
deserialized. DALI's random draws come from one pipeline seed per (seed, epoch, rank, start step) of
the pipeline's first step: a resumed run sees the same rows in the same order, not the same
augmentation draws (the torch path seeds per sample).

Colour jitter differs in one model: DALI's hue is a rotation in YIQ (luma kept), torchvision shifts
HSV hue; brightness, contrast, saturation and greyscale match torchvision's to ~1-2 levels.

A file DALI cannot decode kills its pipeline, so the split is scanned once up front with
data.datasets.load_image (cached on disk per file by its path, size and mtime, and in-process per file list;
or scanned elsewhere, e.g. on rank 0, and handed in): bad files raise or are replaced like the torch
path does (by the next decodable row); files DALI would decode differently from load_image (alpha,
non-DALI formats) are converted once to RGB PNGs in the cache. A file that goes bad after the scan
(truncated, deleted, swapped for another format) kills the pipeline mid-run: the files of the failing
step are scanned again, bad ones raise or are replaced from then on, changed ones are converted, and the
pipeline is rebuilt from that step, so the batches go on as the torch path's do. Paths DALI's file list
cannot hold (a line break, trailing whitespace) are refused when the loader is made.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, math as dmath, pipeline_def, types
from nvidia.dali.auto_aug import augmentations as auto_aug_ops
from nvidia.dali.auto_aug.core import select, signed_bin
from nvidia.dali.auto_aug.rand_augment import get_rand_augment_suite
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image

from data import atomic
from data.datasets import BadImageError, Split, check_on_bad_image, load_image
from data.sampler import split_sampler
from data.transforms import (BARLOW_TWINS_PAIR, IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_MAX_MAGNITUDE, Augment,
                             barlow_twins_min_scale, blur_kernel, cutout_area, translate_padding)
from data.views import View, empty_batch, views_of
from data.errors import InputError

log = logging.getLogger(__name__)

MEAN_255 = [255 * m for m in IMAGENET_MEAN]
STD_255 = [255 * s for s in IMAGENET_STD]
# stream() builds a pipeline per this many steps or more (whole epochs): rebuilds are rare, file lists short.
STREAM_MIN_STEPS = 256
# How many steps from a failing one DALI may have read ahead (prefetch_queue_depth=2, plus the reader's own):
# a file that went bad is looked for among their files.
READ_AHEAD_STEPS = 4
# A file list line is "path label": DALI splits it at the last whitespace and trims the path, so a path
# with a line break or ending in whitespace cannot be listed.
_UNLISTABLE = re.compile(r"[\n\r]|[ \t\v\f]\Z")


# ---------------------------------------------------------------- augmentation graph pieces

def _coin(p):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _uniform(low, high):
    return fn.random.uniform(range=[low, high])


def _normalise(images, flip):
    """uint8 HWC -> float32 CHW normalised, flipped horizontally with p=0.5 when `flip`."""
    mirror = fn.random.coin_flip() if flip else 0
    return fn.crop_mirror_normalize(images, mirror=mirror, mean=MEAN_255, std=STD_255, dtype=types.FLOAT,
                                    output_layout="CHW")


def _fit(images, image_shape, size):
    """torchvision's Resize(size) + CenterCrop(size), to the pixel: the same output sizes and offsets.

    Shorter side to `size` and the longer one to floor(size * long / short) (DALI alone would round),
    bilinear antialiased (PIL's filter); the crop offset is round-half-to-even((side - size) / 2).
    """
    height_width = fn.cast(image_shape[0:2], dtype=types.INT32)
    resized = (height_width * size) // dmath.min(image_shape[0], image_shape[1])
    images = fn.resize(images, size=fn.cast(resized, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                       antialias=True)
    excess = resized - size
    half = excess // 2
    start = half + (excess - 2 * half) * (half - 2 * (half // 2))   # half + 1 when excess odd and half odd
    return fn.slice(images, start=start, shape=[size, size], axis_names="HW")


def _colour_jitter_and_grey(images):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, then grayscale with p=0.2, as one colour twist.

    One fused affine colour transform costs the same whatever the parameters, and a conditional
    branch costs more than the ~16% of samples it could skip, so every sample goes through it.
    """
    jitter = fn.cast(_coin(0.8), dtype=types.FLOAT)
    keep_colour = 1.0 - fn.cast(_coin(0.2), dtype=types.FLOAT)
    return fn.color_twist(images,
                          brightness=1.0 + jitter * _uniform(-0.4, 0.4),
                          contrast=1.0 + jitter * _uniform(-0.4, 0.4),
                          saturation=(1.0 + jitter * _uniform(-0.2, 0.2)) * keep_colour,
                          hue=jitter * _uniform(-36.0, 36.0))   # 0.1 of the hue circle


def _gaussian_blur(images, kernel, p):
    """Gaussian blur, sigma ~ U(0.1, 2), reflected borders, with probability p.

    Two 1-D fn.filter passes with a per-sample kernel built in the graph, because fn.gaussian_blur is
    several times slower on CPU (docs/results.md, loader); a skipped sample gets sigma ~0, i.e. the
    identity kernel.
    """
    sigma = _uniform(0.1, 2.0)
    if p < 1:
        sigma = fn.cast(_coin(p), dtype=types.FLOAT) * (sigma - 1e-3) + 1e-3
    taps = types.Constant(np.square(np.arange(kernel, dtype=np.float32) - kernel // 2))
    weights = dmath.exp(taps * (-0.5 / (sigma * sigma)))
    weights = weights / fn.reductions.sum(weights)
    rows, columns = fn.reshape(weights, shape=[1, kernel]), fn.reshape(weights, shape=[kernel, 1])
    if images.device == "gpu":   # the GPU filter takes its kernels as a GPU input
        rows, columns = rows.gpu(), columns.gpu()
    return fn.filter(fn.filter(images, rows, border="reflect_101"), columns, border="reflect_101")


class _Decoded:
    """A sample's decoded image in the graph, and its torchvision-style fit per size (_fit), built on
    first use and shared by the views that start from it (weak_strong's two)."""

    def __init__(self, encoded, gpu):
        self.images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        self.shape = fn.peek_image_shape(encoded, dtype=types.INT32)   # H, W, C after EXIF orientation
        self._fitted = {}

    def fit(self, size):
        if size not in self._fitted:
            self._fitted[size] = _fit(self.images, self.shape, size)
        return self._fitted[size]


def _barlow_twins_view(decoded, size, augment, blur_p, solarize_p):
    # Crop first: every later op then works on size x size pixels, not on the decoded image.
    images = fn.random_resized_crop(decoded.images, size=[size, size],
                                    random_area=[barlow_twins_min_scale(size), 1.0],
                                    random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_CUBIC,
                                    antialias=True)
    images = _colour_jitter_and_grey(images)
    if blur_p > 0:
        images = _gaussian_blur(images, blur_kernel(size), blur_p)
    if solarize_p > 0:
        if _coin(solarize_p):
            images = auto_aug_ops.solarize.op(images, 128)
    return _normalise(images, augment.flip)


def _train_view(decoded, size, augment):
    images = fn.random_resized_crop(decoded.images, size=[size, size], random_area=[augment.crop_min_scale, 1.0],
                                    random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_LINEAR,
                                    antialias=True)
    return _normalise(images, augment.flip)


def _reflect_translate(images, size, translate):
    """Reflect-pad by `translate` of the side (FixMatch's 12.5%) and take a random size x size window."""
    pad = translate_padding(size, translate)
    if pad == 0:
        return images
    # DALI has no reflect padding: assemble it from mirrored border strips (edge not repeated).
    images = fn.cat(fn.flip(images[:, 1:pad + 1], horizontal=1), images,
                    fn.flip(images[:, size - 1 - pad:size - 1], horizontal=1), axis=1)
    images = fn.cat(fn.flip(images[1:pad + 1], horizontal=0, vertical=1), images,
                    fn.flip(images[size - 1 - pad:size - 1], horizontal=0, vertical=1), axis=0)
    offsets = list(np.arange(2 * pad + 1) / (2 * pad))
    return fn.crop(images, crop=(size, size), crop_pos_x=fn.random.uniform(values=offsets),
                   crop_pos_y=fn.random.uniform(values=offsets))


def _rand_augment(images, size, ops, max_magnitude):
    """RandAugment (torchvision's 14 ops and ranges), `ops` ops per sample, magnitude ~ U{1..max_magnitude}
    per sample on torchvision's scale (RAND_AUGMENT_MAX_MAGNITUDE = each op's full range)."""
    if ops == 0:
        return images
    suite = get_rand_augment_suite(use_shape=True, max_translate_rel=150 / 331)
    op_index = fn.random.uniform(values=list(range(len(suite))), shape=(ops,), dtype=types.INT32)
    magnitude = fn.random.uniform(values=list(range(1, max_magnitude + 1)), dtype=types.INT32)
    # One magnitude for all ops of a sample (as torchvision's RandAugment), a random sign per op.
    magnitude = signed_bin(fn.stack(*[magnitude] * ops), shape=(ops,))
    for level in range(ops):
        images = select(suite, op_index[level], data=images, magnitude_bin=magnitude[level],
                        num_magnitude_bins=RAND_AUGMENT_MAX_MAGNITUDE + 1, shape=[size, size], fill_value=0)
    return images


def _cutout(normalised, size, cutout):
    """One square of cutout_area(cutout) of the image, anywhere inside it, set to 0 (the mean colour)."""
    if cutout == 0:
        return normalised
    side = fn.cast(dmath.sqrt(_uniform(*cutout_area(cutout))) * size, dtype=types.INT32)
    free = fn.cast(size - side, dtype=types.FLOAT)
    anchor = fn.stack(_uniform(0, 1) * free, _uniform(0, 1) * free)
    shape = fn.cast(fn.stack(side, side), dtype=types.FLOAT)
    return fn.erase(normalised, anchor=anchor, shape=shape, axis_names="HW", fill_value=0.0)


def _weak_view(decoded, size, augment):
    return _normalise(_reflect_translate(decoded.fit(size), size, augment.translate), augment.flip)


def _strong_view(decoded, size, augment):
    images = _reflect_translate(decoded.fit(size), size, augment.translate)
    images = _rand_augment(images, size, augment.rand_augment_ops, augment.rand_augment_magnitude)
    return _cutout(_normalise(images, augment.flip), size, augment.cutout)


def _evaluate_view(decoded, size, augment):
    return _normalise(decoded.fit(size), flip=False)


# data.views' augmentation names -> graphs (_Decoded, size, Augment -> view): data.transforms.AUGMENTATIONS'
# twins.
_AUGMENTATIONS = {
    **{name: partial(_barlow_twins_view, **probabilities) for name, probabilities in BARLOW_TWINS_PAIR.items()},
    "train": _train_view,
    "weak": _weak_view,
    "strong": _strong_view,
    "evaluate": _evaluate_view,
}


@pipeline_def(enable_conditionals=True)
def _pipeline(file_list, views, gpu, augment):
    encoded, row = fn.readers.file(file_list=file_list, random_shuffle=False, pad_last_batch=True, name="reader")
    decoded = _Decoded(encoded, gpu)
    return (*(_AUGMENTATIONS[view.augmentation](decoded, view.size, augment) for view in views), row)


_graph_lock = threading.Lock()
_graphs: dict[tuple, bytes] = {}   # (views, gpu, augment) -> serialized graph, traced once per process
_file_list_dir: list[str] = []


def _build_pipeline(rows_and_files, views: tuple[View, ...], gpu, seed, augment: Augment = Augment(), **params):
    """A built pipeline reading `rows_and_files` in order.

    Tracing a graph takes seconds (longest with RandAugment's branches), so each graph is traced once per
    process with its reader on this process's one file list, serialized, and deserialized per pipeline
    after rewriting that list (the reader reads it when the pipeline is built, under the lock).
    """
    with _graph_lock:
        if not _file_list_dir:
            _file_list_dir.append(tempfile.mkdtemp(prefix="semiscale-dali-"))
            atexit.register(shutil.rmtree, _file_list_dir[0], ignore_errors=True)
        file_list = os.path.join(_file_list_dir[0], "files.txt")
        with open(file_list, "w", encoding="utf-8") as f:   # "path label", the label being the row
            f.writelines(f"{path} {row}\n" for row, path in rows_and_files)
        key = (views, gpu, augment)
        if key not in _graphs:
            _graphs[key] = _pipeline(file_list=file_list, views=views, gpu=gpu, augment=augment, **params).serialize()
        pipe = Pipeline.deserialize(serialized_pipeline=_graphs[key], seed=seed, **params)
        pipe.build()
    return pipe


# ---------------------------------------------------------------- file scan (bad files, conversions)

# Decoded by DALI exactly as load_image decodes them (checked: JPEG incl. CMYK/grey/EXIF, PNG incl.
# palette/grey/16-bit, BMP, WebP). Alpha is the exception: load_image composites it on black.
_DALI_FORMATS = {"JPEG", "PNG", "BMP", "WEBP"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def cache_dir() -> str:
    return os.environ.get("SEMISCALE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "semiscale"))


def _converted_dir() -> str:
    """Where _inspect writes the RGB PNG copies of files DALI cannot read as is."""
    return os.path.join(cache_dir(), "rgb")


def _stat(path):
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, 0


def _inspect(path, stat, converted_dir):
    """None when DALI can read `path` as is; else {"bad": reason} or {"converted": png path}."""
    try:
        image = load_image(path)
        with Image.open(path) as header:
            direct = (header.format in _DALI_FORMATS and header.mode not in _ALPHA_MODES
                      and "transparency" not in header.info)
    except BadImageError as e:
        return {"bad": e.reason}
    if direct:
        return None
    target = os.path.join(converted_dir, hashlib.sha1(f"{path}\t{stat}".encode()).hexdigest() + ".png")
    if not os.path.exists(target):
        os.makedirs(converted_dir, exist_ok=True)
        with atomic.replacing(target) as tmp:
            image.save(tmp, format="PNG")
    return {"converted": target}


_scans: dict[tuple[str, ...], dict[str, dict]] = {}   # paths -> scan_files(paths), for this process


def scan_files(paths: list[str], threads: int = 2) -> dict[str, dict]:
    """{path: {"bad": reason} | {"converted": png}} for the files DALI cannot read as is.

    Cached on disk per file by (path, size, mtime): a file is decoded once, whichever stage, rank or list
    of paths (a pretraining set, its labeled part, each predict chunk) meets it first; a later scan stats
    every file, many at a time, and decodes only the new and changed ones. Memoised in-process per list
    of paths, unchecked (a split's files do not change during a run): the loaders of one stage over one
    split (FixMatch's two) stat its files once.
    """
    key = tuple(paths)
    if key not in _scans:
        _scans[key] = _scan(paths, threads)
    return _scans[key]


# os.stat calls in flight at once while a scan looks for changed files: each waits on the filesystem (on a
# network one, a round trip to its metadata server), not on the CPU, so far more than the CPU's threads help.
STAT_THREADS = 32


def _scan(paths, threads):
    """scan_files without the in-process memo."""
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        stats = list(pool.map(_stat, paths, chunksize=256))
    known = {folder: _read_scans(folder) for folder in {os.path.dirname(p) for p in paths}}
    results, unknown = [None] * len(paths), []
    for i, (path, stat) in enumerate(zip(paths, stats)):
        cached = known[os.path.dirname(path)].get(os.path.basename(path))
        if cached is not None and tuple(cached[:2]) == stat and _still_readable(cached[2]):
            results[i] = cached[2]
        else:
            unknown.append(i)
    if unknown:
        converted_dir = _converted_dir()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            inspected = pool.map(lambda i: _inspect(paths[i], stats[i], converted_dir), unknown, chunksize=64)
            for i, result in zip(unknown, inspected):
                results[i] = result
                known[os.path.dirname(paths[i])][os.path.basename(paths[i])] = [*stats[i], result]
        for folder in {os.path.dirname(paths[i]) for i in unknown}:
            _write_scans(folder, known[folder])
    return {p: r for p, r in zip(paths, results) if r is not None}


def _still_readable(result: dict | None) -> bool:
    """A cached result still holds: its converted copy (if any) was not cleaned away from the cache."""
    return result is None or "converted" not in result or os.path.exists(result["converted"])


def _scans_file(folder: str) -> str:
    """The cache of one folder's files: {name: [size, mtime_ns, _inspect's result]}."""
    return os.path.join(cache_dir(), "file_scan", hashlib.sha1(folder.encode()).hexdigest() + ".json")


def _read_scans(folder: str) -> dict:
    try:
        with open(_scans_file(folder), encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_scans(folder: str, entries: dict):
    """Replaced whole: of two processes scanning one folder at once, the last one's entries stay, and a
    file the other one scanned is scanned again next time."""
    path = _scans_file(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_text(path, json.dumps(entries))


def _stand_ins(split: Split, is_bad: np.ndarray) -> np.ndarray:
    """Row -> the row whose image stands in for it: itself, or the next row not `is_bad`, wrapping."""
    good = np.flatnonzero(~is_bad)
    if len(good) == 0:
        raise BadImageError(split.root, f"no decodable image in split {split.name!r}")
    return good[np.searchsorted(good, np.arange(len(is_bad))) % len(good)]


def _decodable_rows(split: Split, found: dict[str, dict], on_bad_image: str) -> np.ndarray:
    """_stand_ins of the rows `found` bad; raises naming the first one when on_bad_image is "error"."""
    is_bad = np.array(["bad" in found.get(p, {}) for p in split.paths], dtype=bool)
    if not is_bad.any():
        return np.arange(len(split.paths))
    first = split.paths[int(np.argmax(is_bad))]
    if on_bad_image == "error":
        raise BadImageError(first, found[first]["bad"])
    stand_in = _stand_ins(split, is_bad)
    log.warning("split %r: %d undecodable image(s) replaced by the next decodable row, e.g. %s: %s",
                split.name, int(is_bad.sum()), first, found[first]["bad"])
    return stand_in


# ---------------------------------------------------------------- loader

def _seed(*entropy) -> int:
    """A DALI pipeline seed (31 bits) drawn from `entropy`."""
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def _gpu_device_id(device: torch.device) -> int | None:
    """The CUDA device index DALI's GPU pipelines run on for training on `device`; None: CPU pipelines.

    The caller decides the device (trainer.dist.resolve_device); this only checks that DALI can use it,
    here rather than at the first pipeline build, where DALI fails with an internal assert.
    """
    if device.type != "cuda":
        return None
    visible = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= visible:
        raise InputError(f"DALI loader on device {device}: cannot build a GPU pipeline, {visible} CUDA device(s) "
                         f"visible")
    return index


class DaliLoader:
    """A data.loaders.BatchLoader (.steps_per_epoch, .epoch(), .stream()) giving data.loaders.Loader's batches."""

    def __init__(self, split: Split, kind: str, *, image_size: int, global_batch: int, rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True, workers: int = 2,
                 on_bad_image: str = "error", scales: list[int] | None = None,
                 device: torch.device | str = "cpu", scanned: dict | None = None, augment: Augment = Augment()):
        """`device`: the torch device the training runs on. `scanned`: scan_files(split.paths) computed
        elsewhere (rank 0, broadcast); None scans here. `augment`: what the training views do."""
        self.views = tuple(views_of(kind, image_size, scales))
        self.augment = augment
        check_on_bad_image(on_bad_image)
        self.sampler = split_sampler(split, global_batch, rank=rank, world=world, seed=seed, shuffle=shuffle,
                                     drop_last=drop_last)
        self.split, self.seed = split, seed
        self.threads = max(1, workers)
        self.device_id = _gpu_device_id(torch.device(device))
        self.gpu = self.device_id is not None
        unlistable = next((p for p in split.paths if _UNLISTABLE.search(p)), None)
        if unlistable is not None:
            raise InputError(f"split {split.name!r}: {os.path.relpath(unlistable, split.root)!r}: DALI's file list "
                             "cannot hold a path with a line break or ending in whitespace; expected the file "
                             "renamed, or data.backend=torch")
        self.on_bad_image = on_bad_image
        found = scan_files(split.paths, self.threads) if scanned is None else scanned
        self.stand_in = _decodable_rows(split, found, on_bad_image)
        self.files = [found.get(p, {}).get("converted", p) for p in split.paths]
        self.labels = None if split.labels is None else torch.as_tensor(split.labels, dtype=torch.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0):
        """Iterator over this rank's batches of `epoch`, from `start_step` on (its pipeline starts at the first)."""
        return self._run(self._steps(epoch, start_step), self._pipeline_seed(epoch, start_step))

    def stream(self, step: int):
        """Endless iterator over this rank's batches from global step `step` on, epoch after epoch.

        The batches of successive epoch() calls, from one pipeline per chunk of whole epochs covering
        at least STREAM_MIN_STEPS steps (each chunk's pipeline starts when the previous one is used up).
        """
        epoch, start_step = self.sampler.stream_start(step)
        return self._stream(epoch, start_step)

    def _stream(self, epoch, start_step):
        while True:
            # The fewest whole epochs from (epoch, start_step) on that hold STREAM_MIN_STEPS steps.
            end = epoch + max(1, -(-(STREAM_MIN_STEPS + start_step) // self.steps_per_epoch))
            steps = self._steps(epoch, start_step)
            for later in range(epoch + 1, end):
                steps += self._steps(later, 0)
            yield from self._run(steps, self._pipeline_seed(epoch, start_step))
            epoch, start_step = end, 0

    def _steps(self, epoch, start_step):
        """This rank's sampler rows per step of `epoch` from `start_step` on (before stand-ins replace bad rows)."""
        self.sampler.set_epoch(epoch, start_step)
        return [np.asarray(step, dtype=np.int64) for step in self.sampler]

    def _run(self, steps, seed):
        """The batches of `steps` (sampler rows per step), all read by one pipeline unless a file goes bad.

        A pipeline that fails has its step's files scanned again (_rescan): once bad ones are replaced (or
        raised) or changed ones converted, a new pipeline, seeded afresh, reads on from the failing step. A
        failure where no file changed is DALI's own and keeps its traceback.
        """
        outputs = [f"view{i}" for i in range(len(self.views))]
        iterator, k = None, 0
        while k < len(steps):
            if len(steps[k]) == 0:
                yield self._empty_batch()
                k += 1
                continue
            try:
                if iterator is None:
                    iterator = self._iterator(steps[k:], outputs, seed if k == 0 else _seed(seed, k))
                out = next(iterator)[0]
            except RuntimeError:
                if not self._rescan(steps[k:k + READ_AHEAD_STEPS]):
                    raise
                iterator = None
                continue
            index = out["row"].reshape(-1).to(torch.int64)
            yield {"views": [out[name] for name in outputs], "label": self._labels_of(index), "index": index}
            k += 1

    def _iterator(self, steps, outputs, seed):
        """A DALI iterator over the rows of `steps`, bad rows read as their stand-ins (it reads a batch ahead)."""
        rows = self.stand_in[np.concatenate(steps)]
        pipe = _build_pipeline(((r, self.files[r]) for r in rows), self.views, self.gpu, seed, self.augment,
                               batch_size=self.sampler.global_batch // self.sampler.world,
                               num_threads=self.threads, device_id=self.device_id, prefetch_queue_depth=2)
        return DALIGenericIterator([pipe], output_map=[*outputs, "row"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def _rescan(self, steps) -> bool:
        """After a pipeline failed at steps[0]: scans the files of `steps` again, as the up-front scan did,
        up to the first step where one has changed (DALI may fail on a step it reads ahead). A file now
        bad raises BadImageError naming it, or (skip) is replaced by the next decodable row from now on; a
        file now in a form DALI does not read as is gets a converted copy. False when nothing changed."""
        converted_dir = _converted_dir()
        for step in steps:
            rows = [int(row) for row in np.unique(self.stand_in[step])]
            paths = [self.split.paths[row] for row in rows]
            with ThreadPoolExecutor(self.threads) as pool:
                found = list(pool.map(lambda p: _inspect(p, _stat(p), converted_dir) or {}, paths))
            bad = [(row, result["bad"]) for row, result in zip(rows, found) if "bad" in result]
            readable = {row: result.get("converted", path) for row, path, result in zip(rows, paths, found)
                        if "bad" not in result}
            changed = {row: file for row, file in readable.items() if file != self.files[row]}
            if not bad and not changed:
                continue
            if bad and self.on_bad_image == "error":
                raise BadImageError(self.split.paths[bad[0][0]], bad[0][1])
            for row, file in changed.items():
                self.files[row] = file
            if bad:
                is_bad = self.stand_in != np.arange(len(self.stand_in))
                is_bad[[row for row, _ in bad]] = True
                self.stand_in = _stand_ins(self.split, is_bad)
                for row, reason in bad:
                    log.warning("split %r: skipping an image that became unreadable during the run (%d undecodable "
                                "in the split so far): %s: %s", self.split.name, int(is_bad.sum()),
                                self.split.paths[row], reason)
            return True
        return False

    def _pipeline_seed(self, epoch, start_step):
        return _seed(self.seed, epoch, self.sampler.rank, start_step)

    def _labels_of(self, index):
        return torch.full_like(index, -1) if self.labels is None else self.labels[index]

    def _empty_batch(self):
        return empty_batch(self.views, torch.device("cuda", self.device_id) if self.gpu else torch.device("cpu"))
