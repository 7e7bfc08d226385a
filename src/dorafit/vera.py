"""VeRA's shared frozen random projections (Kopiczko et al. 2023), regenerated from a seed.

All adapted layers whose weight matrix has the same shape [out, in] share one pair

    A: [r, in], B: [out, r]  ~ Kaiming-uniform (bound 1 / sqrt(fan_in)), from a generator seeded by (seed, out, in)

so the adapter file needs only the seed and the shapes. A fingerprint (SHA-256 of the float32 bytes) is
saved with the adapter, and loading refuses projections that regenerate differently.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
from torch import Tensor


def _derived_seed(seed: int, out: int, inp: int, r: int) -> int:
    digest = hashlib.sha256(f"dorafit-vera:{seed}:{out}:{inp}:{r}".encode()).hexdigest()
    return int(digest[:15], 16)


def _uniform(shape: tuple[int, int], fan_in: int, generator: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound)


def shared_projections(seed: int, r: int, out: int, inp: int) -> tuple[Tensor, Tensor]:
    """The frozen (A [r, in], B [out, r]) for this seed and shape, in float32 on the CPU; deterministic."""
    generator = torch.Generator(device="cpu").manual_seed(_derived_seed(seed, out, inp, r))
    a = _uniform((r, inp), inp, generator)
    b = _uniform((out, r), r, generator)
    return a, b


def fingerprint(a: Tensor, b: Tensor) -> str:
    """A short hex digest of the two projections' float32 values."""
    h = hashlib.sha256()
    for t in (a, b):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@functools.lru_cache(maxsize=256)
def seed_fingerprint(seed: int, r: int, out: int, inp: int) -> str:
    """Fingerprint of the float32 projections this seed generates for this shape (independent of any model dtype)."""
    return fingerprint(*shared_projections(seed, r, out, inp))
