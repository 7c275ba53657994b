"""codellama: an inference engine for Code Llama checkpoints.

The public names are imported on first use, so `python -m llama.<module>` (e.g. `python -m
llama.kernels`) runs that module without importing it a second time through the package.
"""

import importlib
from typing import Any

_EXPORTS = {
    "Llama": "llama.generation",
    "Tokenizer": "llama.tokenizer",
    "ModelArgs": "llama.model",
    "Transformer": "llama.model",
    "Dialog": "llama.prompts",
    "Message": "llama.prompts",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # `llama.<submodule>` after a bare `import llama`, as before
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + __all__)
