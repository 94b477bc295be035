"""Install drop-ins into a framework's own modules and classes, and take them out again.

Each integration lists the attributes it replaces (owner object, attribute name, replacement); a
``Patches`` records the originals so that ``unpatch()`` restores exactly what was there, and
``patched()`` is the context-manager form. Patching twice is a no-op; the owners are the framework's
modules and classes, so pickled models refer to their classes as usual and load with or without
the patch.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, List, Tuple

_MISSING = object()


class Patches:
    def __init__(self, name: str, targets: Callable[[], Iterable[Tuple[object, str, object]]]):
        self.name = name
        self._targets = targets  # called at patch time: the framework is imported then, not before
        self._originals: List[Tuple[object, str, object]] = []

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def patch(self) -> None:
        if self._originals:
            return
        for owner, attr, replacement in self._targets():
            self._originals.append((owner, attr, owner.__dict__.get(attr, _MISSING)
                                    if isinstance(owner, type) else getattr(owner, attr, _MISSING)))
            setattr(owner, attr, replacement)

    def unpatch(self) -> None:
        for owner, attr, original in reversed(self._originals):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._originals = []

    @contextlib.contextmanager
    def patched(self):
        was_active = self.active
        self.patch()
        try:
            yield
        finally:
            if not was_active:
                self.unpatch()


def modules_holding(prefix: str, attr: str, original) -> List[object]:
    """The imported modules under `prefix` whose `attr` is `original` (the modules that did
    ``from framework import original``: they hold their own reference to it)."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is not None and (name == prefix or name.startswith(prefix + ".")):
            if getattr(module, attr, None) is original:
                found.append(module)
    return found
