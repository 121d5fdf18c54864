"""`prepare own`: a dataset from your own data as it is, its options and its run: unlabeled folders, a
labeled ImageFolder tree or CSV, val/test given or drawn from the labeled images; every file found and
decoded once, then copied or linked into ROOT/images (the listing itself: data.prepare.own_sources)."""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np

from data.prepare.dataset_folder import already_prepared, start_fresh
from data.prepare.dataset_writer import (add_link_option, link_folders, make_folders, place_images, write_bad_images,
                                         write_listed_dataset)
from data.prepare.decode_check import decode_check, import_decoder
from data.prepare.own_sources import OWN_SPLITS, list_own, split_listing
from data.prepare.repeated_files import find_listed
from data.prepare.same_pictures import find_copies, write_duplicates
from data.prepare_messages import PrepareError, say, shown

HELP = ("your own data: folders of unlabeled images, a labeled ImageFolder tree or CSV, and val/test given or "
        "drawn from the labeled images")


def add_options(parser: argparse.ArgumentParser):
    parser.add_argument("--unlabeled", nargs="+", required=True, metavar="DIR",
                        help="folders of unlabeled images, in any tree of sub-folders")
    parser.add_argument("--labeled", required=True, metavar="DIR|CSV",
                        help="a folder DIR/<class>/<images> or a CSV path,label (paths relative to the CSV's "
                        "folder or absolute; a label is a class name or a class id)")
    parser.add_argument("--classes", metavar="FILE", help="the class names, one a line (classes.txt); default: "
                        "the labeled folder's class folders, or the labeled CSV's labels, sorted")
    for split in ("val", "test"):
        given = parser.add_mutually_exclusive_group(required=True)
        given.add_argument(f"--{split}", metavar="DIR|CSV", help=f"the {split} images, as --labeled")
        given.add_argument(f"--{split}-per-class", type=int, metavar="N",
                           help=f"or draw the {split} split from the labeled images: N per class, seeded")
    parser.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                        help="an image that cannot be decoded: leave it out and list it in ROOT/bad_images.txt "
                        "(the default), or stop")
    add_link_option(parser)


def prepare(args) -> tuple[dict, dict] | None:
    """(parameters, split sizes) of the dataset written to args.out; None when it already holds it."""
    for option, n in (("--val-per-class", args.val_per_class), ("--test-per-class", args.test_per_class)):
        if n is not None and n < 0:
            raise PrepareError(f"{option} {n}: expected at least 0")
    params = {"source": "own", "unlabeled": [os.path.abspath(d) for d in args.unlabeled],
              "labeled": os.path.abspath(args.labeled),
              "val": args.val and os.path.abspath(args.val), "test": args.test and os.path.abspath(args.test),
              "classes": args.classes and os.path.abspath(args.classes), "val_per_class": args.val_per_class,
              "test_per_class": args.test_per_class, "seed": args.seed, "placement": "link" if args.link else "copy",
              "on_bad_image": args.on_bad_image}
    start = time.perf_counter()
    listing, classes = list_own(args.out, args.labeled, args.unlabeled, args.val, args.test, args.classes)
    n = len(listing.rel)
    say(f"listed {n} images from {len(listing.sources)} sources, {len(classes)} classes "
        f"({time.perf_counter() - start:.1f} s)")
    if already_prepared(args.out, params, args.force):
        return None
    import_decoder()
    with multiprocessing.Pool(args.workers) as pool:
        start = time.perf_counter()
        reasons = find_listed(pool, listing)
        todo = np.flatnonzero([r is None for r in reasons])
        say(f"found {len(todo)} of the {n} files, none listed twice ({time.perf_counter() - start:.1f} s)")
        start = time.perf_counter()
        digests = np.zeros(n, "V16")   # decode_check's digests of the decoded pixels; zeros where unread
        for i, (reason, digest) in zip(todo, pool.imap(decode_check, (listing.src(i) for i in todo), chunksize=256)):
            reasons[i], digests[i] = reason, digest
        good = np.array([r is None for r in reasons], bool)
        bad = [(listing.src(i), reasons[i]) for i in np.flatnonzero(~good)]
        seconds = time.perf_counter() - start
        say(f"decoded {len(todo)} images with {args.workers} processes ({seconds:.1f} s, "
            f"{len(todo) / max(seconds, 1e-9):.0f} images/s)")
        if (bad or listing.misnamed) and args.on_bad_image == "error":
            path, reason = (listing.misnamed + bad)[0]
            raise PrepareError(f"{shown(path)}: {reason} ({len(bad) + len(listing.misnamed)} images cannot be "
                               "used; pass --on-bad-image skip to leave them out, listed in bad_images.txt)")
        del reasons
        copies, twins = find_copies(digests, good, listing.split, listing.label, listing.where, classes)
        good[copies] = False
        del digests
        takes = {name: getattr(args, f"{name}_per_class") for name in ("val", "test") if getattr(args, name) is None}
        splits = split_listing(listing, good, classes, takes, args.seed)
        start_fresh(args.out)
        n_bad = write_bad_images(args.out, listing.misnamed, bad, listing.skipped)
        n_copies = write_duplicates(args.out, copies, twins, listing.split, OWN_SPLITS, listing.src)
        start = time.perf_counter()
        kept, folders = good, []
        if args.link:   # a source folder: one link to it, ROOT/images/<...> -> the folder
            folders = [(s.base, s.prefix) for s in listing.sources if not s.is_csv]
            link_folders(args.out, folders)
            kept = good & listing.from_csv()
        kept = np.flatnonzero(kept)   # files placed one by one: copies, or CSV rows' links
        make_folders(args.out, (listing.out(i) for i in kept))
        placed = place_images(pool, args.link, ((listing.src(i), os.path.join(args.out, listing.out(i))) for i in kept))
    say(f"{'linked' if args.link else 'copied'} {placed} images"
        f"{f' and {len(folders)} folders' if folders else ''} into {args.out}/images "
        f"({time.perf_counter() - start:.1f} s)")
    write_listed_dataset(args.out, classes, listing, splits)
    counts = {name: len(splits[name]) for name in ("labeled", "val", "test", "unlabeled")}
    return params, counts | {"bad_images": n_bad, "duplicates": n_copies}
