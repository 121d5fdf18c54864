"""Listing image files in folder trees: which files are images, which names the dataset's text files
can hold, and class folders (an ImageFolder tree SRC/<class>/<images>)."""
from __future__ import annotations

import os

import numpy as np

from data.labels import refuse_repeated_classes
from data.prepare_messages import PrepareError, shown

# .avif and .heic/.heif need a library Pillow may lack (libavif; a HEIF plugin such as pillow-heif's):
# such files are taken all the same, and the decode check says why it leaves one out (data.datasets).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".avif", ".heic", ".heif")
HIDDEN_FILE = "hidden (its name starts with '.'): left out"
HIDDEN_FOLDER = "a hidden folder (its name starts with '.'): not searched"
LINKED_FOLDER = ("a symlinked folder: not followed, as a link may loop or lead outside the source; pass its "
                 "target as a source of its own, or copy its images in")


def looks_like_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_image(name: str) -> bool:
    return not name.startswith(".") and looks_like_image(name)


def unlistable(name: str) -> str | None:
    """Why the dataset's text files cannot hold the file or class name `name` (None when they can)."""
    if "\n" in name or "\r" in name:
        return "its name holds a line break, which one-name-per-line lists (DALI's, classes.txt) cannot hold"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8, which the dataset's UTF-8 text files cannot hold"
    return None


def unfit_class_name(name: str, blank: str = "its name is blank") -> str | None:
    """Why classes.txt cannot hold the class name `name` (None when it can)."""
    return unlistable(name) or ("" if name.strip() else f"{blank}, which classes.txt cannot hold")


def sub_folders(folder: str, skipped: list) -> list[str]:
    """The names of `folder`'s sub-folders, sorted (symlinked ones too: a class folder may be a link);
    hidden ones left out, appended to `skipped` as (name + '/', why)."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    skipped += [(f"{name}/", HIDDEN_FOLDER) for name in names if name.startswith(".")]
    return [name for name in names if not name.startswith(".")]


def walk_images(folder: str, skipped: list):
    """Image paths under `folder` relative to it, sorted. What it does not take is appended to `skipped`
    as (path relative to `folder`, why), so that prepare lists it: hidden image files, hidden folders,
    symlinked folders (os.walk does not follow them) and folders it cannot read."""
    def rel(parent, name):
        rel_parent = os.path.relpath(parent, folder)
        return name if rel_parent == "." else f"{rel_parent}/{name}"

    def unreadable(error: OSError):
        skipped.append((os.path.relpath(error.filename, folder) + "/", f"cannot read the folder ({error.strerror}): "
                        "not searched"))

    for parent, subfolders, names in os.walk(folder, onerror=unreadable):
        searched = []
        for name in sorted(subfolders):
            if name.startswith("."):
                skipped.append((rel(parent, name) + "/", HIDDEN_FOLDER))
            elif os.path.islink(os.path.join(parent, name)):
                skipped.append((rel(parent, name) + "/", LINKED_FOLDER))
            else:
                searched.append(name)
        subfolders[:] = searched
        for name in sorted(names):
            if is_image(name):
                yield rel(parent, name)
            elif looks_like_image(name):
                skipped.append((rel(parent, name), HIDDEN_FILE))


def loose_images(folder: str) -> list[tuple[str, str]]:
    """(name, why) of the image files right in a folder of class folders, which no class holds."""
    return sorted((e.name, "lies in no class folder: left out") for e in os.scandir(folder)
                  if e.is_file() and is_image(e.name))


def list_folder(src: str) -> tuple[list[str], list[str], np.ndarray, list[tuple[str, str]], list[tuple[str, str]]]:
    """(class names, image paths relative to SRC, labels, (path, reason) of images whose names the
    dataset cannot hold, (path, reason) of what it leaves out: walk_images' and loose_images'); classes
    are the sorted sub-folders."""
    if not os.path.isdir(src):
        raise PrepareError(f"source {src}: no such directory")
    skipped = loose_images(src)
    classes = sub_folders(src, skipped)
    if len(classes) < 2:
        found = ", ".join(f"'{shown(name)}'" for name in classes) or "none"
        raise PrepareError(f"source {src}: expected one sub-folder per class (at least two), found {found}")
    for name in classes:
        reason = unfit_class_name(name)
        if reason:
            raise PrepareError(f"source {src}: class folder '{shown(name)}': {reason}; expected it renamed")
    refuse_repeated_classes(classes, f"source {src}")
    files, labels, misnamed = [], [], []
    for c, name in enumerate(classes):
        inside = []
        for path in (f"{name}/{rel}" for rel in walk_images(os.path.join(src, name), inside)):
            reason = unlistable(path)
            if reason:
                misnamed.append((path, reason))
            else:
                files.append(path)
                labels.append(c)
        skipped += [(f"{name}/{rel}", why) for rel, why in inside]
    return classes, files, np.asarray(labels, dtype=np.int64), misnamed, skipped
