"""The dataset layout on disk: class names, CSV splits, image decoding and a per-sample-seeded Dataset.

ROOT/classes.txt lists one class per line (line number = class id); ROOT/{labeled,val,test}.csv
hold `path,label`, ROOT/unlabeled.csv holds `path` and optionally a hidden `label` (a class id, or
the name of a class outside the class list: data.labels.hidden_label_ids). Paths are relative to ROOT
and must stay inside it; labels are class ids (spaces around them ignored). Files are read through
data.labels: UTF-8, a byte-order mark accepted, class names cleaned.
"""
from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from data import same_content
from data.errors import InputError
from data.labels import hidden_label_ids, read_class_list, read_csv

log = logging.getLogger(__name__)

SPLITS = ("labeled", "val", "test", "unlabeled")


class BadImageError(InputError):
    """An image file that cannot be decoded (missing, empty, truncated, corrupt)."""

    def __init__(self, path, reason=""):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self):
        return f"{self.path}: {self.reason}" if self.reason else str(self.path)


@dataclass
class Split:
    root: str                           # absolute dataset root
    name: str                           # labeled / val / test / unlabeled, or a CSV's stem
    paths: list[str]                    # absolute image paths
    labels: np.ndarray | None           # int64 class ids; None when the split is unlabeled
    hidden_labels: np.ndarray | None    # int64 true labels kept for simulations (unlabeled.csv)

    def __len__(self):
        return len(self.paths)


def read_classes(root) -> list[str]:
    return read_class_list(os.path.join(root, "classes.txt"))


def _escapes_root(rel: str) -> bool:
    """True when `rel` is empty, absolute or climbs out of ROOT (normalised only when it holds '..')."""
    if not rel or rel.startswith("/"):
        return True
    if ".." not in rel:
        return False
    norm = posixpath.normpath(rel)
    return norm == ".." or norm.startswith("../")


def _is_integer(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _first_bad_line(csv_path: str, rows: list, is_bad, expected: str):
    """Raises naming the first row for which `is_bad(row)` holds (line numbers count the header)."""
    for lineno, row in enumerate(rows, start=2):
        if is_bad(row):
            raise InputError(f"{csv_path}:{lineno}: expected {expected}, got {row!r}")


def split_csv(root, name) -> str:
    """The CSV read_split reads for `name`: ROOT/<name>.csv for a name in SPLITS, else `name` itself."""
    if name in SPLITS:
        return os.path.join(os.path.abspath(root), f"{name}.csv")
    if str(name).endswith(".csv"):
        return str(name)
    raise InputError(f"split {name!r}: expected one of {', '.join(SPLITS)} or a path ending in .csv")


def read_split(root, name) -> Split:
    """Reads ROOT/<name>.csv (name in SPLITS) or a CSV at path `name` whose paths are relative to ROOT.

    Only the CSV is validated here; image files are opened (and found missing) at load time. The
    checks run over whole columns and rescan the rows only to name the first bad line.
    """
    root = os.path.abspath(root)
    csv_path = split_csv(root, name)
    split_name = name if name in SPLITS else os.path.splitext(os.path.basename(csv_path))[0]
    classes = read_classes(root)
    num_classes = len(classes)
    header, rows = read_csv(csv_path, "the split")
    if not header or header[0] != "path":
        raise InputError(f"{csv_path}:1: expected a header starting with 'path' (path,label), got {header}")
    label_col = header.index("label") if "label" in header else None
    if label_col is None and split_name in ("labeled", "val", "test"):
        raise InputError(f"{csv_path}:1: expected a 'label' column in the header, got {header}")
    width = len(header)
    if any(len(row) != width for row in rows):
        _first_bad_line(csv_path, rows, lambda row: len(row) != width, f"{width} fields ({','.join(header)})")
    relative = [row[0] for row in rows]
    if any(_escapes_root(rel) for rel in relative):
        _first_bad_line(csv_path, rows, lambda row: _escapes_root(row[0]), f"a path relative to and inside {root}")
    paths = [f"{root}/{rel}" for rel in relative]
    if label_col is not None and split_name == "unlabeled":
        hidden = np.array(hidden_label_ids([row[label_col] for row in rows], csv_path, classes), np.int64)
        return Split(root, split_name, paths, None, hidden)
    labels = None
    if label_col is not None:
        expected = f"an integer label in [0, {num_classes}) in column {label_col + 1}"
        try:
            labels = np.array([row[label_col] for row in rows], dtype=np.int64)
        except ValueError:
            _first_bad_line(csv_path, rows, lambda row: not _is_integer(row[label_col]), expected)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            _first_bad_line(csv_path, rows, lambda row: not 0 <= int(row[label_col]) < num_classes, expected)
    if split_name == "unlabeled":
        return Split(root, split_name, paths, None, labels)
    return Split(root, split_name, paths, labels, None)


def labeled_with_pseudo_labels(root, labeled: str, pseudo_labels: str = "") -> Split:
    """A labeled split plus a pseudo-label CSV (path,label[,score]) whose rows must name unlabeled
    images; an image labeled since (active learning) keeps its real label only."""
    split = read_split(root, labeled)
    if not pseudo_labels:
        return split
    pseudo = read_split(root, pseudo_labels)
    if pseudo.labels is None:
        raise InputError(f"{pseudo_labels}:1: expected a 'label' column")
    unlabeled = set(read_split(root, "unlabeled").paths)
    for row, path in enumerate(pseudo.paths, start=2):
        if path not in unlabeled:
            raise InputError(f"{pseudo_labels}:{row}: {os.path.relpath(path, pseudo.root)} "
                             f"is not an image of unlabeled.csv")
    pseudo = without(pseudo, split.paths)
    return Split(split.root, f"{split.name}+pseudo", split.paths + pseudo.paths,
                 np.concatenate([split.labels, pseudo.labels]), None)


def without(split: Split, paths) -> Split:
    """`split` less its images in `paths` (labels and hidden labels stay with their rows): the unlabeled
    pool once the labeled or pseudo-labeled images are taken out of it."""
    taken = set(paths)
    keep = np.array([p not in taken for p in split.paths], bool)
    labels = None if split.labels is None else split.labels[keep]
    hidden = None if split.hidden_labels is None else split.hidden_labels[keep]
    return replace(split, paths=[p for p, k in zip(split.paths, keep) if k], labels=labels, hidden_labels=hidden)


def _canonical(split: Split) -> list[str]:
    """The split's paths with '.', '..' and '//' resolved; only the rare paths that hold them are normalised."""
    n = len(split.root)
    return [posixpath.normpath(p) if p.find("/.", n) >= 0 or p.find("//", n) >= 0 else p for p in split.paths]


def _first_shared(first: list[str], second: list[str], shared: set[str], labels=None) -> tuple[int, int]:
    """(row in `first`, row in `second`) of the first path of `second` in `shared`; with `labels` (a pair
    of label arrays), the first one whose two labels differ when there is one."""
    rows = {p: i for i, p in enumerate(first) if p in shared}
    pairs = [(rows[p], j) for j, p in enumerate(second) if p in shared]
    if labels is not None:
        return next(((i, j) for i, j in pairs if labels[0][i] != labels[1][j]), pairs[0])
    return pairs[0]


def _first_repeat(paths: list[str]) -> tuple[int, int] | None:
    """(first row, repeating row) of the first path listed twice (None when none is)."""
    seen = {}
    for row, path in enumerate(paths):
        first = seen.setdefault(path, row)
        if first != row:
            return first, row
    return None


def _relative(root: str, path: str) -> str:
    """A split's `path` (ROOT/...) as its CSV spells it."""
    return path[len(root) + 1:]


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")


def check_dataset(root, labeled: str = "labeled") -> list[str]:
    """Checks ROOT's classes and splits against each other before a stage trains on them; returns the
    warnings, raises ValueError (one line, naming the CSV and line) for an error.

    `labeled` is a split name or a labeled CSV, as read_split takes (active learning's labeled.csv).
    Errors: fewer than two classes; a path twice in one split; an image in two of labeled, val and test
    (with its two labels when they differ); a val or test image in unlabeled.csv (a leak); labeled, val
    or test files missing on disk (the first named, with the count; unlabeled files are left to
    data.on_bad_image, as a split may hold 500k of them). Warnings: labeled images also in unlabeled.csv
    (normal: FixMatch and active learning take them out of the unlabeled pool); classes without a
    labeled image; val/test images of such classes; val/test images with a copy under another name in
    another split (the same bytes: data.same_content; skipped where prepare compared them). Sets and
    numpy over whole columns; rows are rescanned only to name one.
    """
    root = os.path.abspath(root)
    classes = read_classes(root)
    if len(classes) < 2:
        raise InputError(f"{os.path.join(root, 'classes.txt')}: expected at least two classes, got "
                         f"{len(classes)} ({_some(classes)})")
    names = {"labeled": labeled, "val": "val", "test": "test", "unlabeled": "unlabeled"}
    splits = {role: read_split(root, name) for role, name in names.items()}
    csvs = {role: split_csv(root, name) for role, name in names.items()}
    if splits["labeled"].labels is None:
        raise InputError(f"{csvs['labeled']}:1: expected a 'label' column")
    keys = {role: _canonical(split) for role, split in splits.items()}
    sets = {role: set(paths) for role, paths in keys.items()}
    for role, paths in keys.items():
        if len(sets[role]) < len(paths):
            first, again = _first_repeat(paths)
            raise InputError(f"{csvs[role]}:{again + 2}: {_relative(root, splits[role].paths[again])} is already "
                             f"listed on line {first + 2}: expected each image once per split "
                             f"({len(paths) - len(sets[role])} repeated row(s))")
    for one, two in (("labeled", "val"), ("labeled", "test"), ("val", "test"), ("val", "unlabeled"),
                     ("test", "unlabeled")):
        shared = sets[one] & sets[two]
        if not shared:
            continue
        labels = (splits[one].labels, splits[two].labels) if two != "unlabeled" else None
        i, j = _first_shared(keys[one], keys[two], shared, labels)
        where = f"{csvs[one]}:{i + 2} and {csvs[two]}:{j + 2}"
        if labels is not None and labels[0][i] != labels[1][j]:
            label_one, label_two = labels[0][i], labels[1][j]
            problem = (f"labeled {label_one} ({classes[label_one]!r}) in {csvs[one]}:{i + 2} and {label_two} "
                       f"({classes[label_two]!r}) in {csvs[two]}:{j + 2}: expected one label per image")
        elif two == "unlabeled":
            problem = f"in both {where}: expected no {one} image in unlabeled.csv, where training would see it"
        else:
            problem = f"in both {where}: expected labeled, val and test to share no image"
        raise InputError(f"{_relative(root, splits[two].paths[j])} is {problem} ({len(shared)} shared)")
    missing = [(role, row) for role in ("labeled", "val", "test")
               for row, path in enumerate(splits[role].paths) if not os.path.isfile(path)]
    if missing:
        role, row = missing[0]
        raise InputError(f"{csvs[role]}:{row + 2}: {_relative(root, splits[role].paths[row])}: no such file "
                         f"({len(missing)} of the labeled, val and test files are missing)")

    warnings = []
    reused = len(sets["labeled"] & sets["unlabeled"])
    if reused:
        warnings.append(f"{reused} of the {len(keys['labeled'])} images of {csvs['labeled']} are also in "
                        f"{csvs['unlabeled']}: FixMatch and active learning leave them out of the unlabeled pool, "
                        "pretraining sees them twice")
    per_class = np.bincount(splits["labeled"].labels, minlength=len(classes))
    unlearned = np.flatnonzero(per_class == 0)
    if len(unlearned):
        warnings.append(f"{len(unlearned)} of the {len(classes)} classes have no labeled image in {csvs['labeled']}: "
                        f"{_some([classes[c] for c in unlearned])}")
    for role in ("val", "test"):
        orphans = per_class[splits[role].labels] == 0
        if orphans.any():
            found = np.unique(splits[role].labels[orphans])
            warnings.append(f"{csvs[role]}: {int(orphans.sum())} image(s) of {len(found)} class(es) that no labeled "
                            f"image has ({_some([classes[c] for c in found])}), which training cannot learn")
    return warnings + _copies_across(root, keys, csvs)


def _copies_across(root: str, keys: dict[str, list[str]], csvs: dict[str, str]) -> list[str]:
    """A warning per pair of splits where val or test images have a byte-identical copy under another name
    (data.same_content), leaving out the rows prepare compared (its record; the CSVs unchanged since)."""
    recorded = same_content.checked_csvs(root)
    checked = {role for role in keys if f"{role}.csv" in recorded and csvs[role] == os.path.join(root, f"{role}.csv")}
    compared = keys
    if checked >= {"val", "test", "unlabeled"} and "labeled.csv" in recorded:
        if "labeled" in checked:
            return []
        # active learning's labeled CSV: its rows from labeled.csv or unlabeled.csv were compared by prepare
        known = set(_canonical(read_split(root, "labeled"))) | set(keys["unlabeled"])
        compared = {"val": keys["val"], "test": keys["test"], "labeled": [p for p in keys["labeled"] if p not in known]}
        if not compared["labeled"]:
            return []
    warnings = []
    for (scored, other), (n, first, copy) in same_content.byte_copies(compared).items():
        harm = f"training sees them, so the score on {scored} can be inflated" if other not in same_content.SCORED \
            else "both splits score them"
        warnings.append(f"{n} image(s) of {csvs[scored]} have a copy with the same bytes under another name in "
                        f"{csvs[other]} (the first: {_relative(root, first)} and {_relative(root, copy)}): {harm}; "
                        "`prepare own` and `prepare folder` leave such copies out")
    return warnings


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow clips >8-bit grey to 255 instead of rescaling; treat it as 16-bit data.
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels carry arbitrary colour: composite on black so they become black.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path) -> Image.Image:
    """Decodes any PIL-readable image (any mode, EXIF-rotated) to RGB, or raises BadImageError."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Exception as e:  # PIL reports corrupt data through many exception types
        raise BadImageError(path, _undecodable(path, e)) from None


def _undecodable(path, error: Exception) -> str:
    """Why Pillow could not decode `path`: a format it has no plugin for here (HEIC without a HEIF plugin,
    AVIF without libavif), or the error of a corrupt file."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if isinstance(error, UnidentifiedImageError) and extension not in Image.registered_extensions():
        return (f"cannot decode: this Pillow has no decoder for {extension or 'extension-less'} files (a plugin "
                "can add one); expected it converted to PNG or JPEG")
    return f"cannot decode ({type(error).__name__}: {error})"


def check_on_bad_image(on_bad_image: str) -> None:
    """Raises unless `on_bad_image` is "error" (a bad image raises) or "skip" (the next decodable row
    stands in for it): the two policies of ImageDataset and of data.dali's DaliLoader."""
    if on_bad_image not in ("error", "skip"):
        raise InputError(f"on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed per (seed, epoch, sample), independent of workers, ranks and resume."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0])


class ImageDataset(torch.utils.data.Dataset):
    """Items are (views, label, index): `transform(image)` -> tuple of tensors, label -1 when unknown.

    The augmentation of sample i in epoch e is seeded by (seed, e, i) alone. With on_bad_image="skip"
    an undecodable row is replaced by the next decodable row (i+1, i+2, ... wrapping), and the item
    reports that row's label and index, so pixels, label and index always belong together.
    """

    def __init__(self, split: Split, transform, seed: int = 0, on_bad_image: str = "error"):
        check_on_bad_image(on_bad_image)
        self.split, self.transform, self.seed, self.on_bad_image = split, transform, seed, on_bad_image
        self.epoch = 0
        self.bad_images: set[str] = set()   # undecodable files met by this process (warned once each)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.split.paths)

    def _decodable(self, index):
        """(row index, image) of `index` or, in skip mode, of the next decodable row."""
        n = len(self.split.paths)
        for row in ((index + k) % n for k in range(n)):
            path = self.split.paths[row]
            if path in self.bad_images:
                continue
            try:
                return row, load_image(path)
            except BadImageError as e:
                if self.on_bad_image == "error":
                    raise
                self.bad_images.add(path)
                log.warning("skipping unreadable image (%d so far in this process): %s", len(self.bad_images), e)
        raise BadImageError(self.split.root, f"no decodable image in split {self.split.name!r}")

    def __getitem__(self, index):
        row, image = self._decodable(index)
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also (slowly) reseed every GPU's generator.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            views = self.transform(image)
        label = -1 if self.split.labels is None else int(self.split.labels[row])
        return views, label, row
