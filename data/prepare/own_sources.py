"""The inputs of `prepare own`, listed: unlabeled folder trees, a labeled ImageFolder tree or CSV
`path,label`, and optional val/test sources as the labeled one, with class names resolved to ids.
Every image is one row of a `Listing` (columns, not objects)."""
from __future__ import annotations

import os

import numpy as np

from data.labels import clean, label_ids, read_class_list, read_csv, refuse_repeated_classes
from data.prepare.balanced_splits import draw_from_labeled
from data.prepare.dataset_folder import refuse_nesting
from data.image_trees import IMAGE_EXTENSIONS, loose_images, sub_folders, unfit_class_name, unlistable, walk_images
from data.prepare_messages import PrepareError, say, shown, some_names

OWN_SPLITS = ("labeled", "val", "test", "unlabeled")
SPLIT_CODES = {name: code for code, name in enumerate(OWN_SPLITS)}


class Source:
    """One input of `own`: a folder (class sub-folders when labeled, any tree when unlabeled) or a CSV
    `path,label`. An image is kept as `rel`: its path relative to `base`, or its absolute path when a
    CSV names a file outside the CSV's folder; `src(rel)` is the file, `out(rel)` its name in ROOT."""

    def __init__(self, option: str, given: str, split: str, prefix: str):
        self.option, self.given, self.split, self.prefix = option, given, split, prefix
        self.is_csv = not os.path.isdir(given)
        self.base = os.path.dirname(os.path.abspath(given)) if self.is_csv else os.path.abspath(given)
        self.base_slash = self.base.rstrip("/") + "/"

    def __str__(self):
        return f"{self.option} {self.given}"

    def src(self, rel: str) -> str:
        return rel if rel.startswith("/") else self.base_slash + rel

    def out(self, rel: str) -> str:
        return f"{self.prefix}/_abs{rel}" if rel.startswith("/") else f"{self.prefix}/{rel}"

    def where(self, rel: str, line: int) -> str:
        return f"{self.given}:{line} ({shown(rel)})" if self.is_csv else shown(self.src(rel))


class Listing:
    """Every listed image, one row each: columns, not objects (500k rows cost tens of MB)."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        self.rel: list[str] = []
        self.source, self.label, self.line = [], [], []
        self.misnamed: list[tuple[str, str]] = []    # (source path, reason) of names the dataset cannot hold
        self.skipped: list[tuple[str, str]] = []     # (source path, reason) of what the walks left out

    def add_tree(self, source_id: int, sub: str = "", label: int = -1):
        """Adds the images of the source's folder `sub` ('' or 'name/'), and what it leaves out to `skipped`."""
        source, skipped = self.sources[source_id], []
        for rel in walk_images(source.base_slash + sub, skipped):
            self.add(source_id, sub + rel, label)
        self.skipped += [(source.src(sub + rel), why) for rel, why in skipped]

    def add(self, source_id: int, rel: str, label: int = -1, line: int = 0):
        reason = unlistable(rel)
        if reason:
            self.misnamed.append((self.sources[source_id].src(rel), reason))
            return
        self.rel.append(rel)
        self.source.append(source_id)
        self.label.append(label)
        self.line.append(line)

    def freeze(self):
        self.source = np.asarray(self.source, np.int32)
        self.label = np.asarray(self.label, np.int64)
        self.line = np.asarray(self.line, np.int64)
        self.split = np.asarray([SPLIT_CODES[s.split] for s in self.sources], np.int8)[self.source]

    def from_csv(self) -> np.ndarray:
        """Per row: whether a CSV listed it (else a folder did)."""
        return np.asarray([s.is_csv for s in self.sources], bool)[self.source]

    def src(self, i: int) -> str:
        return self.sources[self.source[i]].src(self.rel[i])

    def out(self, i: int) -> str:
        return self.sources[self.source[i]].out(self.rel[i])

    def where(self, i: int) -> str:
        return self.sources[self.source[i]].where(self.rel[i], int(self.line[i]))

    def origin(self, i: int) -> str:
        """The option (and CSV line) that listed row i: `--unlabeled DIR`, `--val CSV:LINE`."""
        source = self.sources[self.source[i]]
        return f"{source}:{self.line[i]}" if source.is_csv else str(source)


def class_folders(listing: Listing, source: Source) -> list[str]:
    skipped = loose_images(source.base)
    loose = len(skipped)
    names = sub_folders(source.base, skipped)
    listing.skipped += [(source.src(rel), why) for rel, why in skipped]
    for name in names:
        reason = unfit_class_name(name)
        if reason:
            raise PrepareError(f"{source}: class folder '{shown(name)}': {reason}; expected it renamed")
    if not names:
        raise PrepareError(f"{source}: expected one sub-folder per class, found none")
    if loose:
        say(f"{source}: left out {loose} images that lie in no class folder")
    return names


def read_csv_rows(source: Source) -> list[tuple[int, str, str]]:
    """(line, path, label) of a `path,label` CSV (data.labels.read_csv; a header naming both columns)."""
    header, rows = read_csv(source.given, "the CSV")
    if "path" not in header or "label" not in header:
        raise PrepareError(f"{source.given}:1: expected a header with 'path' and 'label' columns, got {header or None}")
    path_col, label_col, width = header.index("path"), header.index("label"), len(header)
    listed = []
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != width:
            raise PrepareError(f"{source.given}:{line}: expected {width} fields ({','.join(header)}), got {row!r}")
        if not row[path_col] or not row[label_col].strip():
            raise PrepareError(f"{source.given}:{line}: expected a path and a label, got {row!r}")
        listed.append((line, row[path_col], row[label_col]))
    return listed


def csv_rel(source: Source, path: str, root: tuple[str, str]) -> str:
    """`path` of a CSV row as Source.rel: relative to the CSV's folder when inside it, else absolute
    (normalised either way, so '..' never reaches a name in ROOT)."""
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(source.base, path))
    if any(full == r or full.startswith(r + "/") for r in root):
        raise PrepareError(f"{source.given}: {shown(path)} lies inside --out {root[0]}, which a rebuild "
                           "deletes; expected images outside --out")
    return full[len(source.base_slash):] if full.startswith(source.base_slash) else full


class ClassIds:
    """Class names (cleaned: data.labels.clean) -> ids; a label column names classes or (names win) gives ids
    into the class list, never both (data.labels.label_ids)."""

    def __init__(self, classes: list[str], origin: str):
        refuse_repeated_classes(classes, origin)   # class folders whose names differ in spaces or Unicode form
        self.classes, self.origin = [clean(name) for name in classes], origin
        for name in self.classes:
            reason = unfit_class_name(name, "it is blank")
            if reason:
                raise PrepareError(f"{origin}: class '{shown(name)}': {reason}; expected it renamed")
        self.ids = {name: c for c, name in enumerate(self.classes)}

    def column(self, rows: list[tuple[int, str, str]], path: str) -> list[int]:
        """The class ids of read_csv_rows' rows of the CSV `path`."""
        return label_ids([label for _, _, label in rows], [line for line, _, _ in rows], path, self.classes,
                         self.origin)


def list_labeled(listing: Listing, source_id: int, ids: ClassIds | None, root: tuple[str, str]) -> ClassIds:
    """Adds a labeled source's images; returns the class ids (those given, or the source's own: the
    labeled set names the classes when neither --classes nor an earlier source did)."""
    source = listing.sources[source_id]
    if source.is_csv:
        rows = read_csv_rows(source)
        if ids is None:   # the labeled CSV names the classes
            ids = ClassIds(sorted({clean(label) for _, _, label in rows}), f"the labeled set {source.given}")
        for (line, path, _), label in zip(rows, ids.column(rows, source.given)):
            listing.add(source_id, csv_rel(source, path, root), label, line)
        return ids
    folders = class_folders(listing, source)
    if ids is None:
        ids = ClassIds(folders, f"the labeled set {source.given}")
    for name in folders:
        if clean(name) not in ids.ids:
            raise PrepareError(f"{source}: class folder '{shown(name)}' is not a class of {ids.origin} "
                               f"({some_names(ids.classes)})")
        listing.add_tree(source_id, f"{name}/", ids.ids[clean(name)])
    return ids


def own_sources(out: str, labeled: str, unlabeled: list[str], val: str | None, test: str | None) -> list[Source]:
    """The inputs in order (labeled, val, test, then the unlabeled trees), each with its folder in ROOT."""
    sources = []
    for option, given, split in (("--labeled", labeled, "labeled"), ("--val", val, "val"),
                                 ("--test", test, "test")):
        if given is None:
            continue
        if not os.path.isdir(given) and not os.path.isfile(given):
            raise PrepareError(f"{option} {given}: no such folder or CSV file")
        sources.append(Source(option, given, split, f"images/{split}"))
    tags = set()
    for i, given in enumerate(unlabeled):
        if not os.path.isdir(given):
            raise PrepareError(f"--unlabeled {given}: no such folder (expected a folder of images, in any tree)")
        tag = os.path.basename(os.path.abspath(given)) or "root"
        tag = tag if not unlistable(tag) and not tag.startswith(".") else f"source{i + 1}"
        unique, n = tag, 1
        while unique in tags:
            n += 1
            unique = f"{tag}-{n}"
        tags.add(unique)
        sources.append(Source("--unlabeled", given, "unlabeled", f"images/unlabeled/{unique}"))
    for source in sources:
        refuse_nesting(source.given, out)
    return sources


def list_own(out: str, labeled: str, unlabeled: list[str], val: str | None = None, test: str | None = None,
             classes_file: str | None = None) -> tuple[Listing, list[str]]:
    """Every image of every source with its class id (-1: unlabeled); checks classes and labels, and
    that no CSV row names a file inside --out `out`."""
    root = (os.path.abspath(out), os.path.realpath(os.path.abspath(out)))
    listing = Listing(own_sources(out, labeled, unlabeled, val, test))
    if classes_file:
        ids = ClassIds(read_class_list(classes_file), f"--classes {classes_file}")
    else:
        ids = None
    ids = list_labeled(listing, 0, ids, root)
    if not listing.rel:
        raise PrepareError(f"{listing.sources[0]}: the labeled set is empty; expected labeled images "
                           "(an ImageFolder tree <class>/<image> or a CSV path,label)")
    if len(ids.classes) < 2:
        raise PrepareError(f"{listing.sources[0]}: expected at least two classes, found "
                           f"{len(ids.classes)} ({some_names(ids.classes)})")
    for source_id, source in enumerate(listing.sources[1:], start=1):
        before, skipped_before = len(listing.rel) + len(listing.misnamed), len(listing.skipped)
        if source.split == "unlabeled":
            listing.add_tree(source_id)
        else:
            list_labeled(listing, source_id, ids, root)
        if len(listing.rel) + len(listing.misnamed) == before:
            left_out = listing.skipped[skipped_before:]
            raise PrepareError(f"{source}: " + ("the CSV lists no image" if source.is_csv else
                               f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)}"
                               f"{' in its class folders' if source.split != 'unlabeled' else ''}"
                               + (f"; left out {len(left_out)}, the first {shown(left_out[0][0])}: {left_out[0][1]}"
                                  if left_out else "") + ")"))
    listing.freeze()
    clashing_names(listing)
    return listing, ids.classes


def clashing_names(listing: Listing):
    """A CSV row outside its folder goes to <prefix>/_abs/<its absolute path>: raises should that name
    also be one of a row inside the folder (a sub-folder named _abs)."""
    for source_id, source in enumerate(listing.sources):
        if not source.is_csv:
            continue
        rows = np.flatnonzero(listing.source == source_id)
        outside = {listing.rel[i] for i in rows if listing.rel[i].startswith("/")}
        if not outside:
            continue
        for i in rows:
            rel = listing.rel[i]
            if rel.startswith("_abs/") and rel[4:] in outside:
                raise PrepareError(f"{listing.where(i)}: its name in --out would be that of {rel[4:]}, which "
                                   f"{source.given} also lists; expected a folder other than _abs")


def split_listing(listing: Listing, good: np.ndarray, classes: list[str], takes: dict, seed: int) -> dict:
    """Sorted row indices per split of the `good` rows: val/test as listed, or per `takes` (split ->
    per-class count) drawn seeded from the labeled rows, which keep the rest."""
    labeled_rows = np.flatnonzero(good & (listing.split == SPLIT_CODES["labeled"]))
    if not len(labeled_rows):
        raise PrepareError(f"{listing.sources[0]}: the labeled set is empty: none of its images can be read")
    drawn = draw_from_labeled(listing.label[labeled_rows], classes, takes, seed)
    splits = {name: np.sort(labeled_rows[rows]) for name, rows in drawn.items()}
    for name in ("val", "test", "unlabeled"):
        if name not in splits:
            splits[name] = np.flatnonzero(good & (listing.split == SPLIT_CODES[name]))
    return splits
