"""Package exports imported on first use (PEP 562), so that importing a package costs only what is used."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any


class _Package(types.ModuleType):
    """A package whose export may share its name with the submodule defining it (`gpt2lab.generate`,
    the function, from `gpt2lab/generate.py`).

    Importing a submodule sets it as an attribute of its package (importlib's _find_and_load), which
    would replace the exported function by the module whenever the submodule is imported before the
    name is first looked up. The attribute is the function, as an eager `from .generate import
    generate` would leave it.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        exports = self.__dict__.get("_EXPORTS", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(
    package: str, exports: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` for `exports` (public name -> submodule defining it),
    which the package must also keep as its global `_EXPORTS`.

    The first look-up of a name imports its submodule and stores the value in the package's
    `namespace` (its globals()), so later look-ups do not come back here.
    """
    sys.modules[package].__class__ = _Package

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
