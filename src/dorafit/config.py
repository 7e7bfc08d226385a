"""The adapter configuration: one dataclass, every field documented, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from torch import nn

#: how targets are named: a list of names (a module matches if its full name equals one or ends with
#: "." + one), a regular expression string (full match on the module name), or a (name, module) -> bool callable.
Targets = Union[list[str], str, Callable[[str, nn.Module], bool]]

METHODS = ("lora", "dora", "vera", "dvora")
#: methods that decompose the weight into magnitude and direction (DoRA-style)
DECOMPOSED_METHODS = ("dora", "dvora")
#: the directional update each method uses
UPDATE_OF_METHOD = {"lora": "lora", "dora": "lora", "vera": "vera", "dvora": "vera"}
INITS = ("kaiming", "gaussian")
MAGNITUDE_GRADS = ("save", "recompute")


@dataclass
class AdapterConfig:
    """How to adapt a model. Defaults follow the DoRA paper's commonsense set-up where one exists."""

    method: str = "dora"
    """'lora' (Hu et al. 2021), 'dora' (Liu et al. 2024), 'vera' (Kopiczko et al. 2023), or 'dvora' (DoRA whose
    directional update is VeRA's, DoRA paper section 5.5)."""
    r: int = 8
    """rank of the update (for VeRA: rank of the shared random projections)."""
    alpha: float = 16.0
    """LoRA scale numerator: s = alpha / r, or alpha / sqrt(r) with rslora. Unused by VeRA."""
    targets: Targets = field(default_factory=lambda: ["q_proj", "v_proj"])
    """modules that get the full method: a list of names or name suffixes, a regex, or a (name, module) callable."""
    magnitude_only: Targets | None = None
    """modules that get only a trainable DoRA magnitude, no directional update (paper Table 6); dora/dvora only."""
    rslora: bool = False
    """rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r."""
    dropout: float = 0.0
    """dropout on the adapter input: y = (m/n) * (W0 x + dW dropout(x)) + b (no effect on embeddings)."""
    detach_norm: bool = True
    """treat the norm ||W0 + dW|| as a constant in backward (paper section 4.3); False: full gradient (eqs. 6-7)."""
    magnitude_grad: str = "save"
    """dora/dvora/magnitude-only: what the magnitude's gradient dL/dm_j = sum_tokens(g_j * pre_j) / n_j (paper
    eq. 7; pre = W0 x + dW x, the layer output before the magnitude, without bias) keeps from forward to
    backward. 'save': the layer's output y = (m/n) pre + b, one [tokens, out] tensor per layer, which costs no
    memory where the next operation keeps y anyway (attention's v, a gated MLP's up, GELU's input) and one
    [tokens, out] tensor more than LoRA elsewhere; no extra time. 'recompute': nothing beyond what LoRA keeps;
    backward computes pre = W0 x + P (Q x) again, without grad, from the input LoRA keeps anyway (one more
    forward product of the layer per step). Both are exact. Under torch.compile, 'recompute' wraps the layer in a
    checkpointed region (torch.utils.checkpoint), which makes the compiled graph recompute it in backward; inside
    activation checkpointing the layer is recomputed anyway and 'save' costs no memory beyond the block being
    recomputed. See benchmarks/README.md for what each costs."""
    init: str = "kaiming"
    """init of lora_A: 'kaiming' (uniform, like nn.Linear) or 'gaussian' (normal, std 1/r); lora_B starts at 0."""
    extra_trainable: list[str] = field(default_factory=list)
    """modules trained in full next to the adapters (e.g. a classification head); saved with the adapter."""
    vera_seed: int = 0
    """seed of VeRA's shared frozen projections; the same seed and shapes regenerate them exactly."""
    vera_d_init: float = 0.1
    """initial value of VeRA's lambda_d (its lambda_b starts at 0)."""
    save_vera_projections: bool = False
    """also store VeRA's shared projections in the adapter file (otherwise regenerated from the seed)."""
    eps: float = 1e-12
    """floor on the norm n; all-zero weight rows give n = eps instead of 0/0."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.magnitude_grad not in MAGNITUDE_GRADS:
            raise ValueError(f"unknown magnitude_grad {self.magnitude_grad!r}; choose one of {', '.join(MAGNITUDE_GRADS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.magnitude_only is not None and not self.decomposed:
            raise ValueError(f"magnitude_only needs a decomposed method (dora or dvora), not {self.method!r}")
        for name, value in (("targets", self.targets), ("magnitude_only", self.magnitude_only)):
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"{name} is not a valid regular expression: {exc}") from None
        if isinstance(self.extra_trainable, str):
            self.extra_trainable = [self.extra_trainable]

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
