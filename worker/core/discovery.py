"""Which unlearning methods there are: found, not listed.

A method is a module `worker/core/<name>.py` that defines a class whose `name` is `<name>` and
which has the method interface (`worker.core.base.UnlearningMethod`). A new method is a new
module, nothing else. Pure: it imports code, nothing more (serving uses it with no database).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

import worker.core
from worker.core.base import UnlearningMethod

# what a class needs to be a method (see worker.core.base.UnlearningMethod)
METHOD_INTERFACE = ("train", "plan", "apply", "budget", "predictor")


def method_names() -> list[str]:
    """Every method there is: each module `worker/core/<name>.py` that defines a class whose `name`
    is `<name>` and which has the method interface. A new method is a new module, nothing else.
    Imports every core module (and so torch): call it when the list is needed, not at import."""
    return sorted(name for name in _core_modules() if _method_class(name) is not None)


def method_for(name: str) -> type[UnlearningMethod]:
    """The class implementing method `name` (instantiate it to use it); imports only its module."""
    found = _method_class(name) if name in _core_modules() else None
    if found is None:
        raise ValueError(f"method must be one of {', '.join(method_names())}, not {name!r}")
    return found


def _core_modules() -> set[str]:
    return {module.name for module in pkgutil.iter_modules(worker.core.__path__) if not module.ispkg}


@functools.cache
def _method_class(module_name: str) -> type[UnlearningMethod] | None:
    module = importlib.import_module(f"{worker.core.__name__}.{module_name}")
    for _, candidate in inspect.getmembers(module, inspect.isclass):
        if (candidate.__module__ == module.__name__ and getattr(candidate, "name", None) == module_name
                and all(callable(getattr(candidate, attribute, None)) for attribute in METHOD_INTERFACE)):
            return candidate
    return None
