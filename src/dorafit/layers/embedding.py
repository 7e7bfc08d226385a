"""``nn.Embedding``: the table [num, dim] read as the linear map one-hot(num) -> dim, i.e. ``W0 = table.T``.

So ``lora_A`` is [r, num], ``lora_B`` is [dim, r] and DoRA's magnitude is [dim]: the same layout as the PEFT
library. The adapter input is a token id, so dropout does not apply. As in ``nn.Embedding``, outputs at
``padding_idx`` pass no gradient (to the adapter either). Subclasses that scale their output
(e.g. Gemma's ``embed_scale``) are scaled after the adapter, like their own forward does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerOps


class EmbeddingOps(LayerOps):
    supports_dropout = False
    zero_factor = "A"

    def check(self, module: nn.Module) -> None:
        if module.max_norm is not None:
            raise ValueError("embeddings with max_norm rewrite their weight during forward and cannot be adapted")

    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight.T  # [dim, num]

    def _embed(self, module: nn.Module, ids: Tensor, table: Tensor) -> Tensor:
        return F.embedding(ids, table, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)

    def base(self, module: nn.Module, x: Tensor) -> Tensor:
        return self._embed(module, x, module.weight)

    def down(self, module: nn.Module, x: Tensor, q: Tensor) -> Tensor:
        return self._embed(module, x, q.T)  # [..., r]

    def up(self, module: nn.Module, u: Tensor, p: Tensor) -> Tensor:
        return F.linear(u, p)  # [..., dim]

    def finish(self, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if module.padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
            y = torch.where((x == module.padding_idx).unsqueeze(-1), y.detach(), y)
        scale = getattr(module, "embed_scale", None)
        return y if scale is None else y * scale.to(y.dtype)
