"""``torch.compile`` for adapted models: what to call, and why in place.

Every adapted layer (LoRA, DoRA, VeRA, DVoRA, magnitude-only) traces without a graph break, so a whole
transformers model compiles to one graph in training and in eval (``fullgraph=True`` works where the model's
own code allows it), and nothing recompiles per layer or per optimizer step: DoRA's cached norms are reached
through opaque custom operators (:mod:`dorafit.norm_cache`), and its output scale is plain operations that
Inductor fuses (:mod:`dorafit.magnitude_scale`). Switching train/eval, merging, or ``dorafit.disabled`` changes
what the layers do, and Dynamo compiles once more for each such state.

Compile in place (``model.compile()``), not through the wrapper ``torch.compile(model)`` returns: the wrapper's
parameter and module names start with ``_orig_mod.``, which changes state-dict keys, so an adapter saved from
it would not load into a plain model.
"""

from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile ``model`` in place (``model.compile(**compile_kwargs)``, i.e. ``torch.compile`` of its forward)
    and return it; names, state-dict keys, ``save_adapter``, ``merge`` and the optimizer's parameters stay as
    they are. ``compile_kwargs`` go to ``torch.compile`` (``fullgraph``, ``mode``, ``backend``, ``dynamic``).

    Compilation happens on the first call, separately for training and eval mode. Call it after
    ``dorafit.apply`` (or ``load_adapter``) and after moving the model to its device and dtype.
    """
    model.compile(**compile_kwargs)
    return model
