"""The unlearning methods, found, not listed.

A method is a module `worker/core/methods/<name>.py` that defines a class whose `name` is `<name>`
and which has the method interface (`worker.core.base.UnlearningMethod`). A new method is a new
module, nothing else. A method module imports components of `worker.core` (sharding, networks,
training...), never another method. Pure: finding the methods imports code, nothing more
(serving uses it with no database).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from worker.core.base import UnlearningMethod

# what a class needs to be a method (see worker.core.base.UnlearningMethod)
METHOD_INTERFACE = ("train", "plan", "apply", "budget", "predictor")


def method_names() -> list[str]:
    """Every method there is: each module `worker/core/methods/<name>.py` that defines a class whose
    `name` is `<name>` and which has the method interface. A new method is a new module, nothing else.
    Imports every method module (and so torch): call it when the list is needed, not at import."""
    return sorted(name for name in _method_modules() if _method_class(name) is not None)


def method_for(name: str) -> type[UnlearningMethod]:
    """The class implementing method `name` (instantiate it to use it); imports only its module."""
    found = _method_class(name) if name in _method_modules() else None
    if found is None:
        raise ValueError(f"method must be one of {', '.join(method_names())}, not {name!r}")
    return found


def _method_modules() -> set[str]:
    return {module.name for module in pkgutil.iter_modules(__path__) if not module.ispkg}


@functools.cache
def _method_class(module_name: str) -> type[UnlearningMethod] | None:
    module = importlib.import_module(f"{__name__}.{module_name}")
    for _, candidate in inspect.getmembers(module, inspect.isclass):
        if (candidate.__module__ == module.__name__ and getattr(candidate, "name", None) == module_name
                and all(callable(getattr(candidate, attribute, None)) for attribute in METHOD_INTERFACE)):
            return candidate
    return None
