"""Listing image files in folder trees: which files are images, which names the dataset's text files
can hold, and class folders (an ImageFolder tree SRC/<class>/<images>)."""
from __future__ import annotations

import os

import numpy as np

from data.prepare_messages import PrepareError, shown

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


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


def sub_folders(folder: str) -> list[str]:
    """The names of `folder`'s sub-folders, sorted, hidden ones left out."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def walk_images(folder: str):
    """Image paths under `folder` relative to it (sorted, hidden files and folders left out)."""
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel_parent = os.path.relpath(parent, folder)
        for name in sorted(names):
            if is_image(name):
                yield name if rel_parent == "." else f"{rel_parent}/{name}"


def list_folder(src: str) -> tuple[list[str], list[str], np.ndarray, list[tuple[str, str]]]:
    """(class names, image paths relative to SRC, labels, (path, reason) of images whose names the
    dataset cannot hold); classes are the sorted sub-folders."""
    if not os.path.isdir(src):
        raise PrepareError(f"source {src}: no such directory")
    classes = sub_folders(src)
    if len(classes) < 2:
        found = ", ".join(f"'{shown(name)}'" for name in classes) or "none"
        raise PrepareError(f"source {src}: expected one sub-folder per class (at least two), found {found}")
    for name in classes:
        reason = unfit_class_name(name)
        if reason:
            raise PrepareError(f"source {src}: class folder '{shown(name)}': {reason}; expected it renamed")
    files, labels, misnamed = [], [], []
    for c, name in enumerate(classes):
        for path in (f"{name}/{rel}" for rel in walk_images(os.path.join(src, name))):
            reason = unlistable(path)
            if reason:
                misnamed.append((path, reason))
            else:
                files.append(path)
                labels.append(c)
    return classes, files, np.asarray(labels, dtype=np.int64), misnamed
