"""The folder a prepared dataset lives in: idempotent (prepare.json, written last, records the
parameters), and an interrupted run is never trusted (a marker file until `finish`); a rebuild removes
only prepare's own OUTPUTS, and a source may not lie inside it (nor it inside a source)."""
from __future__ import annotations

import json
import os
import shutil

from data import atomic
from data.prepare_messages import PrepareError
from data.same_content import CHECKED, MANIFEST, csv_digests

INCOMPLETE, DUPLICATES = ".prepare-incomplete", "duplicates.txt"
OUTPUTS = ("images", "classes.txt", "labeled.csv", "val.csv", "test.csv", "unlabeled.csv", "bad_images.txt", MANIFEST)
# written by the modes that compare pictures (own, folder, and fashion-mnist since it does): removed by a
# rebuild, not required of a dataset
OPTIONAL_OUTPUTS = (DUPLICATES,)
# a count of val or test pictures whose copies in other splits a mode kept (fashion-mnist): check_dataset
# must go on finding them, so the CSVs are not recorded as checked
SCORED_COPIES = "scored_copies"


def refuse_nesting(source: str, root: str):
    """Raises when the source and ROOT are one folder or one lies inside the other (symlinks resolved).

    A rebuild replaces ROOT/images, which would delete a source inside ROOT; a ROOT inside a folder
    source would be read back as one more class by the next run.
    """
    source_real, root_real = os.path.realpath(source), os.path.realpath(root)
    common = os.path.commonpath([source_real, root_real])
    if common == root_real:
        raise PrepareError(f"source {source} lies inside --out {root}: rebuilding --out would delete it; "
                           "expected a source outside --out (move the images out first)")
    if common == source_real:
        raise PrepareError(f"--out {root} lies inside the source {source}: expected an --out outside the source")


def already_prepared(root: str, params: dict, force: bool) -> bool:
    """True when ROOT holds a finished dataset built with `params`; raises when ROOT holds something else."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise PrepareError(f"--out {root} is a file; expected a new or empty folder, or a dataset to rebuild")
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        if force:
            return False
        try:
            with open(manifest, encoding="utf-8") as f:
                previous = json.load(f)["params"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrepareError(f"{manifest}: cannot read the parameters of the dataset there ({e}); "
                               "pass --force to rebuild it, or choose another --out") from None
        if previous != params:
            raise PrepareError(f"{root} holds a dataset prepared with other parameters ({previous}); "
                               "pass --force to rebuild it, or choose another --out")
        return all(os.path.exists(os.path.join(root, name)) for name in OUTPUTS)
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, INCOMPLETE)):
        raise PrepareError(f"{root} is not empty and is not a semiscale dataset; choose a new or empty --out")
    return False


def start_fresh(root: str):
    """Marks ROOT incomplete (until `finish`) and removes any earlier outputs, and the temporary files of
    a killed run's writes."""
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, INCOMPLETE), "w").close()
    for name in OUTPUTS + OPTIONAL_OUTPUTS + tuple(n for n in os.listdir(root) if n.endswith(atomic.TEMPORARY)):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    os.makedirs(os.path.join(root, "images"))


def finish(root: str, params: dict, counts: dict):
    """Writes the manifest. A mode that compared the images of its splits counts the `duplicates` it listed
    (own, folder: left out); the manifest then records the CSVs so checked, which check_dataset trusts while
    they are unchanged, unless val or test pictures kept a copy (SCORED_COPIES counted)."""
    _write_manifest(root, {"params": params, "counts": counts})
    os.remove(os.path.join(root, INCOMPLETE))


def add_counts(root: str, counts: dict):
    """Adds `counts` to the manifest of ROOT's finished dataset, and the record as `finish` writes it: a
    comparison of the pictures made on a dataset prepared before prepare compared them."""
    with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
        record = json.load(f)
    _write_manifest(root, {"params": record["params"], "counts": record["counts"] | counts})


def _write_manifest(root: str, record: dict):
    if "duplicates" in record["counts"] and not record["counts"].get(SCORED_COPIES):
        record[CHECKED] = csv_digests(root)
    atomic.write_text(os.path.join(root, MANIFEST), json.dumps(record, indent=2) + "\n")
