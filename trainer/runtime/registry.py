"""Algorithms a config names: a Registry maps each name to what builds that algorithm.

An entry registers itself where it is defined (`@REGISTRY.register("name")`), and its name becomes a
choice of the config key the registry serves (trainer.runtime.config's `choice` takes a registry), so a
name is written once. The modules that define the built-in entries are imported the first time the
names are read: a config validates its choice without the caller importing the training code, and an
entry registered later (a plug-in's, a test's) counts from then on.

This module imports nothing heavy: trainer.runtime.config imports it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterator

from data.errors import InputError


class Registry:
    def __init__(self, key: str, builtins: tuple[str, ...]):
        self.key = key                  # the config key that chooses among the names, for error messages
        self.builtins = builtins        # the modules whose import registers the built-in entries
        self._entries: dict[str, Callable] = {}
        self._builtins_loaded = False

    def register(self, name: str) -> Callable:
        """A decorator that adds the entry under `name` and returns it unchanged."""
        def add(entry):
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._entries[name] = entry
            return entry
        return add

    def _all(self) -> dict[str, Callable]:
        if not self._builtins_loaded:
            for module in self.builtins:
                importlib.import_module(module)
            self._builtins_loaded = True
        return self._entries

    def __contains__(self, name) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        """The names, in the order they were registered."""
        return iter(self._all())

    def __getitem__(self, name: str) -> Callable:
        entries = self._all()
        if name not in entries:
            raise InputError(f"{self.key}={name!r}: expected one of {', '.join(entries)}")
        return entries[name]


# fixmatch.variant: a semi-supervised algorithm (trainer/algorithms/semi_supervised.py says what an entry is)
SEMI_SUPERVISED = Registry("fixmatch.variant", ("trainer.algorithms.fixmatch",))
# pretrain.method: a self-supervised pretraining method (trainer/algorithms/self_supervised.py)
SELF_SUPERVISED = Registry("pretrain.method", ("trainer.algorithms.self_supervised",))
