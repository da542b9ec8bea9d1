"""Old module paths of bcosify 0.1, kept importable for one release with a ``DeprecationWarning``.

``import bcosify.viz`` and ``from bcosify.viz import x`` both resolve to the new module, which is registered
under the old name too (so there is one module object, not a copy).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "bcosify.viz": "bcosify.explanation.viz",
    "bcosify.metrics": "bcosify.explanation.gridpg",
    "bcosify.checks": "bcosify.explanation.checks",
    "bcosify.recipes": "bcosify.training.recipes",
    "bcosify.saving": "bcosify.export.folder",
    "bcosify.checkpoints": "bcosify.weights",
}
# (``bcosify.convert`` is not aliased: importing a module under that name would shadow the function
# ``bcosify.convert`` on the package; ``build_model`` moved to ``bcosify.weights``.)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
