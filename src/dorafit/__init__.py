"""dorafit: exact, fast LoRA and DoRA (Weight-Decomposed Low-Rank Adaptation) for any PyTorch model.

    import dorafit
    cfg = dorafit.AdapterConfig(method="dora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    dorafit.apply(model, cfg)
    ...train...
    dorafit.save_adapter(model, "out/adapter")
    plain = dorafit.merge_and_unload(model)
"""

__version__ = "0.1.0"

from .compiling import compile_model  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .dequantize import dequantize  # noqa: E402
from .inject import (  # noqa: E402
    adapted_modules,
    adapter_names,
    adapter_state_dict,
    apply,
    disabled,
    get_config,
    merge,
    merge_and_unload,
    trainable_parameter_count,
    unload,
    unmerge,
)
from .io import AdapterFileError, load_adapter, read_adapter, save_adapter, set_adapter_state_dict  # noqa: E402
from .multi import per_row_adapters, set_adapter  # noqa: E402
from .peft_format import PeftFormatError, export_peft, import_peft  # noqa: E402
from .quantize import quantize_model  # noqa: E402

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
