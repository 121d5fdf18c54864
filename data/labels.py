"""Labels as people write them, read one way everywhere: CSV files, class lists and label columns.

- A CSV is UTF-8 with or without a byte-order mark (spreadsheets write one); `read_csv` reads every CSV
  semiscale takes (the dataset's splits, pseudo-labels, prepare's labeled CSVs, active learning's answers).
- A class name or label loses the spaces around it and is compared in Unicode NFC (`clean`): "cat " is
  "cat", and "café" typed on a keyboard (é) is "café" from a macOS folder name (e + a combining accent),
  so neither makes a class of its own. A class list naming one class twice that way is refused, showing
  both spellings' code points (`repeated_class`).
- A label column holds class names or class ids, never both (`label_ids`): "1" next to "cat" is refused
  rather than read as a name here and an id there.

Free of torch: launch/prepare.py reads class lists and labeled CSVs through it.
"""
from __future__ import annotations

import csv
import unicodedata

from data.errors import InputError
from data.prepare_messages import some_names


def clean(text: str) -> str:
    """A class name or label as semiscale compares and writes it: no spaces around it, Unicode in NFC."""
    return unicodedata.normalize("NFC", text.strip())


def read_csv(path: str, what: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV, the header's names cleaned (an empty file: no header, no rows); `what` names
    the file in an error ("the split", "the answers")."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read {what} ({e})") from None
    return ([clean(name) for name in rows[0]], rows[1:]) if rows else ([], [])


def _code_points(text: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in text)


def repeated_class(names: list[str]) -> tuple[int, int, str] | None:
    """(first, again, how) for the first name of `names` that is an earlier one once cleaned: `how` is ""
    when the two are spelled alike, else " (their code points: ...)". None when every class is named once."""
    seen = {}
    for i, name in enumerate(names):
        first = seen.setdefault(clean(name), i)
        if first != i:
            how = "" if names[first] == name else (
                f" ({_code_points(names[first])} and {_code_points(name)}: one name once the spaces around it are "
                "dropped and its Unicode is normalised to NFC)")
            return first, i, how
    return None


def refuse_repeated_classes(names: list[str], where: str):
    """Raises, naming `where` (the folder or option that gave the class names), when two of `names` are one
    class once cleaned: class folders 'café' and 'café' in two Unicode forms, or 'cat' and 'cat '."""
    repeated = repeated_class(names)
    if repeated:
        first, again, how = repeated
        raise InputError(f"{where}: classes {names[first]!r} and {names[again]!r} are one class{how}; expected one "
                         "name for it")


def label_ids(labels: list[str], lines: list[int], path: str, classes: list[str], origin: str) -> list[int]:
    """The class ids of a label column: every label (cleaned) a class name of `classes` or every label a class
    id in [0, C); a name wins over an id. labels[i] is on line lines[i] of `path`; `origin` says where the
    classes come from. Raises at the first label that is neither, or of the other kind than the first label."""
    ids = {clean(name): c for c, name in enumerate(classes)}
    out, first = [], None
    for label, line in zip(map(clean, labels), lines):
        if label in ids:
            kind, value = "name", ids[label]
        elif label.isascii() and label.isdigit() and int(label) < len(classes):
            kind, value = "id", int(label)
        else:
            raise InputError(f"{path}:{line}: label {label!r} is neither a class name of {origin} "
                             f"({some_names(classes)}) nor a class id in [0, {len(classes)})")
        if first is None:
            first = (kind, label, line)
        elif kind != first[0]:
            raise InputError(f"{path}:{line}: label {label!r} is a class {kind}, but line {first[2]}'s {first[1]!r} "
                             f"is a class {first[0]}: expected a column of class names or of class ids, not both")
        out.append(value)
    return out


# The hidden label of an unlabeled image whose class is not in the class list (an open-set simulation:
# `prepare fashion-mnist --open-set-classes`): it matches no class the model can predict, so that a
# pseudo-label or an answer on such an image counts as wrong.
OUTSIDE_CLASSES = -1


def hidden_label_ids(labels: list[str], path: str, classes: list[str]) -> list[int]:
    """The class ids of unlabeled.csv's hidden label column (simulations): each label a class id in [0, C),
    or the name of a class outside the class list, read as OUTSIDE_CLASSES (the CSV keeps which class it
    is). Raises at the first label that is neither: a number out of range, an empty label, a class name of
    the list (its id is expected there, as in every split). Line numbers count the header."""
    listed = {clean(name) for name in classes}
    out = []
    for line, label in enumerate(map(clean, labels), start=2):
        number = label.lstrip("+-")
        if label.isascii() and label.isdigit() and int(label) < len(classes):
            out.append(int(label))
        elif label and label not in listed and not (number.isascii() and number.isdigit()):
            out.append(OUTSIDE_CLASSES)
        else:
            listed_name = " (a class of the list: its id is expected)" if label in listed else ""
            raise InputError(f"{path}:{line}: hidden label {label!r}{listed_name}: expected a class id in "
                             f"[0, {len(classes)}) or the name of a class outside the class list")
    return out


def outside_classes(pool_hidden, picked_hidden) -> dict:
    """{"outside_classes": how many picked images (by their hidden labels, arrays) are of classes outside the
    class list} for a pool that holds such images (an open-set simulation), {} for any other pool: what
    pseudo-labels and active learning's queries record of them."""
    if not (pool_hidden == OUTSIDE_CLASSES).any():
        return {}
    return {"outside_classes": int((picked_hidden == OUTSIDE_CLASSES).sum())}


def landed_outside(summary: dict, total: int, noun: str) -> str:
    """"; N of M <noun> landed on images of classes outside the class list" from a summary holding
    outside_classes' count, "" from any other: how every stage says it."""
    if "outside_classes" not in summary:
        return ""
    return f"; {summary['outside_classes']} of {total} {noun} landed on images of classes outside the class list"


def read_class_list(path: str) -> list[str]:
    """One class name per line (classes.txt, prepare's --classes), cleaned, each once, none empty."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the class list ({getattr(e, 'strerror', None) or e})") from None
    for lineno, name in enumerate(lines, start=1):
        if not name.strip():
            raise InputError(f"{path}:{lineno}: expected a class name, got an empty line")
    repeated = repeated_class(lines)
    if repeated:
        first, again, how = repeated
        spelled = f" as {lines[first]!r}" if how else ""
        raise InputError(f"{path}:{again + 1}: class {lines[again]!r} already named on line {first + 1}{spelled}{how}")
    if not lines:
        raise InputError(f"{path}: expected at least one class name, the file is empty")
    return [clean(name) for name in lines]
