"""A folder of images as a split: every image file in its tree, sorted, paths relative to the folder;
symlinks that lead out of the folder refused, names a one-path-a-line file list cannot hold set aside."""
from __future__ import annotations

import os

from data.datasets import Split
from data.errors import InputError
from data.image_trees import IMAGE_EXTENSIONS
from data.prepare_messages import shown


class OutsideFolderError(InputError):
    """A symlinked image or folder of the tree leads outside the folder."""


def unlistable(rel: str) -> str | None:
    """Why predictions.csv (UTF-8) or DALI's file lists (one path a line) cannot hold `rel`; None when they can."""
    if "\n" in rel or "\r" in rel or rel != rel.rstrip():
        return "its name holds a line break or ends in whitespace, which a file list cannot hold"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    return None


def _inside(real: str, folder_real: str) -> bool:
    return real == folder_real or real.startswith(folder_real.rstrip(os.sep) + os.sep)


def image_folder(folder: str) -> tuple[Split, list[tuple[str, str]]]:
    """(the images of `folder`'s tree as a Split with root `folder`, sorted; (path, reason) of the image
    files it cannot list). Image files: IMAGE_EXTENSIONS, any case; names starting with '.' skipped. A
    symlinked image or folder that leads outside `folder` raises OutsideFolderError ("FOLDER: ...");
    symlinked folders inside are not followed (their images are listed under their own path)."""
    root = os.path.abspath(folder)
    root_real = os.path.realpath(root)
    files, unlisted = [], []
    for here, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        images = [name for name in names if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
        for name in subfolders + images:
            full = os.path.join(here, name)
            if os.path.islink(full) and not _inside(os.path.realpath(full), root_real):
                raise OutsideFolderError(f"{folder}: {shown(os.path.relpath(full, root))} is a symlink to "
                                         f"{shown(os.path.realpath(full))}, outside the folder: refused (copy it in)")
        for name in images:
            rel = os.path.relpath(os.path.join(here, name), root)
            reason = unlistable(rel)
            if reason:
                unlisted.append((rel, reason))
            else:
                files.append(rel)
    files.sort()
    return Split(root, os.path.basename(root), [f"{root}/{rel}" for rel in files], None, None), unlisted

