"""Which modules get the adapter: found from the model's architecture, not from a table of model types.

Every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, a quantized linear layer) of a transformer plays one role,
told by its name and the block it sits in (a path component containing ``attn`` or ``attention`` is the
attention block, anything else in the model the feed-forward block):

=========  ==========================================================================================================
role       leaf names (examples)
=========  ==========================================================================================================
``qkv``    attention: ``q_proj`` ``k_proj`` ``v_proj`` (LLaMA, Qwen2/3, Mistral, Gemma 2/3), ``qkv_proj`` (Phi-3),
           ``c_attn`` (GPT-2), ``query_key_value`` (GPT-NeoX, Falcon), ``query`` ``key`` ``value`` (BERT)
``o``      attention: ``o_proj``, ``out_proj``, ``dense`` (GPT-NeoX; BERT's ``attention.output.dense``), ``c_proj``
``up``     feed-forward: ``up_proj``, ``gate_up_proj`` (Phi-3, gate and up in one), ``c_fc`` (GPT-2),
           ``dense_h_to_4h`` (GPT-NeoX), ``fc1``, ``fc_in``, ``w1``/``w3``, ``intermediate.dense`` (BERT)
``gate``   feed-forward: ``gate_proj``
``down``   feed-forward: ``down_proj``, ``c_proj`` (GPT-2), ``dense_4h_to_h``, ``fc2``, ``fc_out``, ``w2``,
           ``output.dense`` (BERT)
=========  ==========================================================================================================

* :func:`default_targets`: the roles ``qkv``, ``up`` and ``down`` - the DoRA paper's q, k, v, up, down projections
  (a fused q/k/v or gate/up layer is adapted whole).
* ``--targets all-linear`` (:func:`all_linear`, PEFT's convention): every linear layer except the output layer
  (``model.get_output_embeddings()``) and the classification head (trained in full beside the adapter).

Both are written as name suffixes where a suffix inside the block selects exactly those modules (``q_proj``,
``mlp.c_proj``), else as the modules' full names (BERT's ``output.dense`` also ends ``attention.output.dense``).
"""

from __future__ import annotations

import re

from torch import nn

ALL_LINEAR = "all-linear"
NONE = "none"  # --targets none: no adapter; only --head trains (e.g. a VLM's projector, LLaVA's stage 1)
#: the DoRA paper's choice: q, k, v, up and down projections
DEFAULT_ROLES = ("qkv", "up", "down")

QKV = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "query", "key", "value", "Wqkv",
       "W_pack", "qkv", "wq", "wk", "wv", "q_lin", "k_lin", "v_lin"}
ATTENTION_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo", "out_lin"}
UP = {"up_proj", "gate_up_proj", "c_fc", "dense_h_to_4h", "fc1", "fc_in", "w1", "w3", "lin1"}
GATE = {"gate_proj"}
DOWN = {"down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "lin2"}
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


class TargetError(ValueError):
    """No adapter targets could be found; the message lists the model's linear layers."""


def is_linear(module: nn.Module) -> bool:
    """A linear layer: ``nn.Linear`` (bitsandbytes' and torchao's quantized ones are subclasses or instances) or
    transformers' GPT-2 ``Conv1D`` (a linear layer with its weight transposed)."""
    from ..layers import _is_gpt2_conv1d

    return isinstance(module, nn.Linear) or _is_gpt2_conv1d(module)


def role(name: str) -> str | None:
    """The role (``qkv``, ``o``, ``up``, ``gate``, ``down``) of the linear layer called ``name``, or None."""
    *path, leaf = name.split(".")
    parent = path[-1] if path else ""
    if any(_ATTENTION.search(part) for part in path):
        if leaf in QKV:
            return "qkv"
        if leaf in ATTENTION_OUT:
            return "o"
        return None
    if leaf in GATE:
        return "gate"
    if leaf in UP or (parent, leaf) == ("intermediate", "dense"):
        return "up"
    if leaf in DOWN or (parent, leaf) == ("output", "dense"):
        return "down"
    return None


def _output_layers(model: nn.Module, skip: list[str]) -> set[str]:
    """Names of the output layer and of the modules under ``skip`` (the head), which no default adapts."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules()
            if module is out or any(name == s or name.startswith(s + ".") for s in skip)}


def _linear_layers(model: nn.Module, skip: list[str]) -> list[str]:
    excluded = _output_layers(model, skip)
    return [name for name, module in model.named_modules() if name and is_linear(module) and name not in excluded]


def as_targets(model: nn.Module, chosen: list[str]) -> list[str]:
    """``chosen`` module names written as the suffixes that select exactly them, in model order (``q_proj``,
    ``mlp.c_proj``); the full names if any of them has no such suffix short of its layer number."""
    names = [name for name, _ in model.named_modules() if name]
    wanted = set(chosen)
    suffixes: list[str] = []
    for name in chosen:
        if any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):
            if parts[start].isdigit():
                return list(chosen)  # reached the layer number: only full names say it
            suffix = ".".join(parts[start:])
            if all(n in wanted for n in names if n == suffix or n.endswith("." + suffix)):
                suffixes.append(suffix)
                break
    return suffixes


def _no_targets(model: nn.Module, what: str, skip: list[str]) -> TargetError:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in _linear_layers(model, skip)})
    return TargetError(f"{what} for a {type(model).__name__}; name them with --targets (or --targets all-linear). "
                       f"Its linear layers: {', '.join(leaves) or '(none)'}")


def default_targets_names(model: nn.Module, roles: tuple[str, ...] = DEFAULT_ROLES) -> list[str]:
    """The full names of the linear layers of ``roles`` (default: q, k, v, up, down)."""
    chosen = [name for name in _linear_layers(model, []) if role(name) in roles]
    if not any(role(name) == "qkv" for name in chosen):
        raise _no_targets(model, "no attention projections (q, k, v) found by name, so no default --targets", [])
    return chosen


def default_targets(model: nn.Module, roles: tuple[str, ...] = DEFAULT_ROLES) -> list[str]:
    """The linear layers of ``roles`` (default: q, k, v, up, down), as :func:`as_targets` writes them."""
    return as_targets(model, default_targets_names(model, roles))


def all_linear(model: nn.Module, head: list[str] | None = None) -> list[str]:
    """``--targets all-linear``: every linear layer but the output layer and the ``head`` modules."""
    chosen = _linear_layers(model, list(head or []))
    if not chosen:
        raise _no_targets(model, "--targets all-linear: no linear layer besides the output layer and head", [])
    return as_targets(model, chosen)


def expand(targets: list[str], model: nn.Module, head: list[str] | None = None) -> list[str]:
    """``--targets`` as stored in a run: the names given, or ``all-linear`` expanded (:func:`all_linear`)."""
    if NONE in targets:
        if len(targets) > 1:
            raise TargetError(f"--targets {NONE} adapts no module; give it alone")
        return []
    if ALL_LINEAR not in targets:
        return list(targets)
    if len(targets) > 1:
        raise TargetError(f"--targets {ALL_LINEAR} selects every linear layer; give it alone, or list the modules "
                          "by name instead")
    return all_linear(model, head)
