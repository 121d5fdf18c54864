"""What launch/prepare.py tells the user: its error class, its progress lines, and file names shown
on one line of text."""
from __future__ import annotations

from data.errors import InputError


class PrepareError(InputError):
    """Bad input, reported as one line and exit status 2."""


def say(message: str):
    print(f"prepare: {message}", flush=True)


def shown(name: str) -> str:
    """`name` on one line of UTF-8 text: line breaks and tabs escaped, bytes that are not UTF-8 as \\xNN."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def some_names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def say_skipped(entries: list[tuple[str, str]], what: str, listing: str, done: str = "skipped"):
    if entries:
        say(f"{done} {len(entries)} {what} (listed in {listing}): "
            + ", ".join(shown(f) for f, _ in entries[:5]) + (", ..." if len(entries) > 5 else ""))
