"""dorafit: exact, fast LoRA and DoRA (Weight-Decomposed Low-Rank Adaptation) for any PyTorch model.

    import dorafit
    cfg = dorafit.AdapterConfig(method="dora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    dorafit.apply(model, cfg)
    ...train...
    dorafit.save_adapter(model, "out/adapter")
    plain = dorafit.merge_and_unload(model)
"""

__version__ = "0.1.0"

import importlib
import sys
import types

#: the public names and the submodule defining each; imported on first use (PEP 562), so that ``import dorafit``
#: (and ``dorafit --help``, ``--version``) does not import torch
_EXPORTS = {
    "compile_model": "compiling",
    "AdapterConfig": "config",
    "dequantize": "dequantize",
    **dict.fromkeys(("adapted_modules", "adapter_names", "adapter_state_dict", "apply", "disabled", "get_config",
                     "merge", "merge_and_unload", "trainable_parameter_count", "unload", "unmerge"), "inject"),
    **dict.fromkeys(("AdapterFileError", "load_adapter", "read_adapter", "save_adapter", "set_adapter_state_dict"),
                    "io"),
    **dict.fromkeys(("per_row_adapters", "set_adapter"), "multi"),
    **dict.fromkeys(("PeftFormatError", "export_peft", "import_peft"), "peft_format"),
    "quantize_model": "quantize",
}


def __getattr__(name: str):
    """A public name (imported from its submodule now), or a submodule (``dorafit.layers``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule ``dorafit.dequantize`` binds it as the package's attribute of that name; the
    package's ``dequantize`` is the function, as the eager imports had it."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "adapted_modules",
    "adapter_names",
    "adapter_state_dict",
    "apply",
    "compile_model",
    "dequantize",
    "disabled",
    "export_peft",
    "get_config",
    "import_peft",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "PeftFormatError",
    "per_row_adapters",
    "quantize_model",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "set_adapter_state_dict",
    "trainable_parameter_count",
    "unload",
    "unmerge",
]
