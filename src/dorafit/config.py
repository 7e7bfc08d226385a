"""The adapter configuration: one dataclass, every field documented, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Union

from . import fields
from .fields import option

#: how targets are named: a list of names (a module matches if its full name equals one or ends with
#: "." + one), a regular expression string (full match on the module name), or a (name, module) -> bool callable.
Targets = Union[list[str], str, Callable[[str, Any], bool]]  # the callable: (name, module) -> bool

METHODS = ("lora", "dora", "vera", "dvora")
#: methods that decompose the weight into magnitude and direction (DoRA-style)
DECOMPOSED_METHODS = ("dora", "dvora")
#: the directional update each method uses
UPDATE_OF_METHOD = {"lora": "lora", "dora": "lora", "vera": "vera", "dvora": "vera"}
INITS = ("kaiming", "gaussian")
#: what a DoRA layer keeps for its magnitude's gradient (AdapterConfig.magnitude_grad)
MAGNITUDE_GRADS = ("save", "recompute")


@dataclass
class AdapterConfig:
    """How to adapt a model. Defaults follow the DoRA paper's commonsense set-up where one exists.

    Every field is declared with :func:`dorafit.fields.option` (help text, choices, range), and
    ``dorafit train`` derives its adapter options from these declarations, so both validate alike.
    """

    method: str = option("dora", "lora (Hu et al. 2021), dora (Liu et al. 2024), vera (Kopiczko et al. 2023) or "
                         "dvora (DoRA whose directional update is VeRA's, DoRA paper section 5.5)", choices=METHODS)
    r: int = option(8, "rank r of the update (VeRA/DVoRA: rank of the shared random projections)", minimum=1)
    alpha: float = option(16.0, "LoRA scale numerator: s = alpha / r (alpha / sqrt(r) with rslora); unused by VeRA",
                          above=0)
    targets: Targets = option(["q_proj", "v_proj"], "modules that get the full method: a list of names or name "
                              "suffixes, a regex, or a (name, module) callable")
    magnitude_only: Targets | None = option(None, "dora/dvora: modules that get only a trainable magnitude, no "
                                            "directional update (paper Table 6)")
    rslora: bool = option(False, "rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r")
    dropout: float = option(0.0, "dropout on the adapter input: y = (m/n) * (W0 x + dW dropout(x)) + b (no effect "
                            "on embeddings)", minimum=0, below=1)
    detach_norm: bool = option(True, "DoRA: treat the weight norm ||W0 + dW|| as a constant in backward (paper "
                               "section 4.3); false: its full gradient (paper eqs. 6-7)")
    magnitude_grad: str = option(
        "save", "DoRA: what the magnitude's gradient dL/dm_j = sum_tokens(g_j * pre_j) / n_j (paper eq. 7; pre = W0 x "
        "+ dW x, the output before the magnitude, without bias) keeps from forward to backward. save: the layer's "
        "output y (free where the next operation keeps y anyway, one [tokens, out] tensor more than LoRA elsewhere; "
        "no extra time); recompute: nothing beyond LoRA's, backward computes pre again from the input LoRA keeps "
        "(one more forward product per step). Both exact. Under torch.compile, recompute runs the layer in a "
        "checkpointed region so the compiled graph recomputes pre; under activation checkpointing the block is "
        "recomputed anyway (benchmarks/README.md)",
        choices=MAGNITUDE_GRADS)
    init: str = option("kaiming", "init of lora_A: kaiming (uniform, like nn.Linear) or gaussian (normal, std 1/r); "
                       "lora_B starts at 0", choices=INITS)
    extra_trainable: list[str] = option([], "modules trained in full next to the adapters (e.g. a classification "
                                        "head); saved with the adapter")
    vera_seed: int = option(0, "seed of VeRA's shared frozen projections; the same seed and shapes regenerate them "
                            "exactly", minimum=0)
    vera_d_init: float = option(0.1, "initial value of VeRA's lambda_d (its lambda_b starts at 0)")
    save_vera_projections: bool = option(False, "also store VeRA's shared projections in the adapter file "
                                         "(otherwise regenerated from the seed)")
    eps: float = option(1e-12, "floor on the norm n; all-zero weight rows give n = eps instead of 0/0", above=0)

    def __post_init__(self) -> None:
        if isinstance(self.extra_trainable, str):
            self.extra_trainable = [self.extra_trainable]
        fields.check(self)
        if self.magnitude_only is not None and not self.decomposed:
            raise ValueError(f"magnitude_only needs a decomposed method (dora or dvora), not {self.method!r}")
        for name, value in (("targets", self.targets), ("magnitude_only", self.magnitude_only)):
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"{name} is not a valid regular expression: {exc}") from None

    @property
    def decomposed(self) -> bool:
        """True for DoRA-style methods (a trainable magnitude per output unit)."""
        return self.method in DECOMPOSED_METHODS

    @property
    def update(self) -> str:
        """The directional update: 'lora' or 'vera'."""
        return UPDATE_OF_METHOD[self.method]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict. Callable targets cannot be stored: save resolves them to module names first."""
        data = dataclasses.asdict(self)
        for key in ("targets", "magnitude_only"):
            if callable(data[key]):
                raise ValueError(f"{key} is a callable; resolve it to module names before saving")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)
