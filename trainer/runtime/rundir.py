"""A run dir that cannot be clobbered: which stage and config made it, one live writer, a metrics log
that a crash or a full disk never leaves unreadable.

    RUN_DIR/run.json        {"stage": ...}: written once, when the stage first claims the folder
    RUN_DIR/config.yaml     the resolved config (contract)
    RUN_DIR/metrics.jsonl   one JSON object per line (contract)
    RUN_DIR/.lock           held (flock) by the live writer; the file itself stays

A stage claims its run dir before writing anything in it: the folder must be new, empty or a run dir of the
same stage (run.json names it): a folder of the user's, which semiscale did not make, is never written to,
cleaned up or moved aside. A run with results in it (a checkpoint, a metrics log) must have been made by a
config that agrees on everything that changes the result, unless `--restart`, which moves the previous
run's files aside into RUN_DIR/replaced/<time>/ instead of deleting them.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil

import yaml
from data import atomic
from data.errors import InputError

log = logging.getLogger(__name__)

RUN_RECORD, CONFIG, METRICS, LOCK, REPLACED = "run.json", "config.yaml", "metrics.jsonl", ".lock", "replaced"
# Keys that change how a run is carried out but not what it computes: a resumed run may change them.
# active.answers / active.oracle: an annotator's answers are imported into the run dir of the queries.
RESULT_NEUTRAL = {"run.dir", "run.restart", "run.log_every", "run.log", "run.checkpoint_every", "run.device",
                  "data.workers", "inference.batch_size", "active.answers", "active.oracle"}
# What a stage leaves behind once it has started computing: a run dir holding none of these is a fresh one.
RESULTS = (METRICS, "checkpoint.pt")


class RunDirError(InputError):
    """A run dir this run must not write to; printed as one line."""


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(previous: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """`key: old -> new` for every result-changing key on which two resolved configs differ. A key the
    previous config lacks (a run made before the key existed) is unchanged if the current value is its
    default in `defaults` (a resolved config of defaults): the key's default is what that run did."""
    old, new, default = _flatten(previous), _flatten(current), _flatten(defaults or {})
    keys = sorted((old.keys() | new.keys()) - RESULT_NEUTRAL)
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys
            if old.get(k) != new.get(k) and not (k not in old and k in default and new.get(k) == default[k])]


def recorded_stage(run_dir: str) -> str | None:
    path = os.path.join(run_dir, RUN_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RunDirError(f"{path}: unreadable run record; is {run_dir} a semiscale run dir?") from None


def check_owner(run_dir: str, stage: str) -> bool:
    """Raise RunDirError unless `run_dir` is new, empty or a run dir of `stage`; True when the latter.
    Empty counts what a claim killed before it wrote run.json leaves (the lock, a temporary of run.json);
    anything else in a folder without run.json is the user's. Reads only."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"run.dir={run_dir}: exists and is not a folder")
    if not os.path.isdir(run_dir):
        return False
    recorded = recorded_stage(run_dir)
    if recorded is None:
        theirs = sorted(name for name in os.listdir(run_dir) if not _left_by_a_claim(run_dir, name))
        if theirs:
            shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
            raise RunDirError(f"run.dir={run_dir}: holds files semiscale did not write ({shown}; no {RUN_RECORD}); "
                              "choose an empty or new run.dir")
    elif recorded != stage:
        raise RunDirError(f"run.dir={run_dir}: a {recorded} run dir, not a {stage} one; choose another run.dir")
    return recorded is not None


def _left_by_a_claim(run_dir: str, name: str) -> bool:
    path = os.path.join(run_dir, name)
    if name == LOCK:   # Lock's file, which it never writes to
        return os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == 0
    return atomic.temporary_target(name) == RUN_RECORD


def check(run_dir: str, stage: str, resolved: dict, restart: bool, defaults: dict | None = None) -> bool:
    """Raise RunDirError when `stage` must not write to `run_dir`; True when it holds a previous run
    that `restart` will move aside. Reads only. `defaults`: the stage's config of defaults, resolved
    (keys added since a previous run compare as their defaults)."""
    if not check_owner(run_dir, stage):
        return False
    previous = _read_config(os.path.join(run_dir, CONFIG))
    started = any(os.path.exists(os.path.join(run_dir, name)) for name in RESULTS)
    if restart:
        return started or previous is not None
    if started and previous is not None:
        changed = config_differences(previous, resolved, defaults)
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise RunDirError(f"run.dir={run_dir}: holds a {stage} run made with another config ({changed[0]}"
                              f"{more}); pass --restart to start over (the old run moves to {REPLACED}/), "
                              "or choose another run.dir")
    return False


def changed_config(run_dir: str, resolved: dict, defaults: dict | None = None) -> list[str]:
    """`key: old -> new` for each result-changing key where `resolved` differs from the config the run in
    `run_dir` was made with (config_differences); [] where it holds no config.yaml."""
    previous = _read_config(os.path.join(run_dir, CONFIG))
    return [] if previous is None else config_differences(previous, resolved, defaults)


def _read_config(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise RunDirError(f"{path}: unreadable ({str(e).splitlines()[0]}); is this a semiscale run dir?") from None
    return tree if isinstance(tree, dict) else {}


class Lock:
    """An exclusive lock on RUN_DIR/.lock for the life of this object. A POSIX record lock (lockf), not
    flock: it belongs to this process alone, so data-loader workers forked from it do not keep it after
    the run is killed, and the kernel drops it the moment the process dies. The price: closing any other
    descriptor of .lock in this process drops it too, so nothing else here opens that file.

    A filesystem without POSIX locks (Lustre mounted noflock, NFS without lockd) answers every lockf with
    an error other than "held": the run warns that it goes on unguarded instead of refusing every stage."""

    HELD = (errno.EACCES, errno.EAGAIN)   # what lockf answers when another process holds the lock

    def __init__(self, run_dir: str, name: str = LOCK):
        """`name`: the lock file's, for a lock on something else in the folder than the run (the annotation
        page's on its answers file)."""
        path = os.path.join(run_dir, name)
        self._file = open(path, "a")
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in self.HELD:
                log.warning("run.dir=%s: cannot lock %s (%s): going on without the guard against a second live "
                            "run writing to it", run_dir, path, e.strerror or e)
                return
            self._file.close()
            raise RunDirError(f"run.dir={run_dir}: another live run is writing to it ({path} is locked)") from None

    def release(self):
        self._file.close()


def claim_pipeline(run_dir: str) -> Lock:
    """The pipeline's own run dir: a pipeline's (or new, or empty), one live pipeline at a time. Its config
    may change between runs: each stage's run dir refuses a changed config for itself."""
    check_owner(run_dir, "pipeline")
    try:
        os.makedirs(run_dir, exist_ok=True)
        return Lock(run_dir)
    except OSError as e:
        raise RunDirError(f"run.dir={run_dir}: cannot write there ({e.strerror})") from None


def move_aside(run_dir: str) -> str:
    """Move everything in `run_dir` but the lock and earlier replaced runs into replaced/<time>/."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(run_dir, REPLACED, stamp)
    os.makedirs(target)
    for name in os.listdir(run_dir):
        if name not in (LOCK, REPLACED):
            shutil.move(os.path.join(run_dir, name), os.path.join(target, name))
    return target


def remove_stray_temporaries(run_dir: str) -> int:
    """Delete the temporary files that a write killed halfway left (every write here is data.atomic's,
    whose names data.atomic.temporary_target knows: any other *.tmp is not ours) in this run's folders.
    Not in replaced/ (earlier runs, kept as they were) nor in sub-runs (folders with their own run record
    or lock, e.g. pseudolabel's fine-tunes), which clean up after themselves."""
    removed = 0
    for folder, subfolders, files in os.walk(run_dir):
        subfolders[:] = [s for s in subfolders if s != REPLACED and not any(
            os.path.exists(os.path.join(folder, s, name)) for name in (RUN_RECORD, LOCK))]
        for name in files:
            if atomic.temporary_target(name) is not None:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def append_line(path: str, line: str):
    """Append one line so that the file only ever holds whole lines: a torn tail left by a crash is cut
    first, and a failed write (a full disk) is undone before the error surfaces."""
    with open(path, "ab+", buffering=0) as f:   # unbuffered: a failed write leaves nothing pending to flush
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                whole = f.read().rfind(b"\n") + 1
                log.warning("%s: cut a torn last line (%d bytes) left by an interrupted write", path, size - whole)
                f.truncate(whole)
                size = whole
        data = line.encode() + b"\n"
        try:
            if f.write(data) != len(data):   # a short write: the disk filled up mid-line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            f.truncate(size)
            raise RunDirError(f"{path}: cannot append ({e.strerror}); the log is left as it was") from None


def read_lines(path: str) -> list[dict]:
    """The JSON objects of a metrics log; a torn last line (a crash mid-write) is skipped with a warning,
    a bad line anywhere else is an error naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    torn = lines.pop()   # "" when the file ends with a newline
    events = []
    for lineno, text in enumerate(lines, start=1):
        try:
            events.append(json.loads(text))
        except ValueError:
            raise RunDirError(f"{path}:{lineno}: not a JSON line ({text[:60]!r})") from None
    if torn:   # a last line without its newline: whole if it parses, torn otherwise
        try:
            events.append(json.loads(torn))
        except ValueError:
            log.warning("%s: skipped a torn last line (%d bytes)", path, len(torn))
    return events
