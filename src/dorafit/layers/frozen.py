"""The input gradient of a frozen low-precision (or quantized) linear layer on a CPU that multiplies that dtype
slowly.

On a CPU without bfloat16 (float16) instructions (no AVX512-BF16 or AMX-BF16; no AVX512-FP16 or AMX-FP16), torch
computes a frozen layer's forward ``x W^T`` at float32's speed but its input gradient ``g W`` (W stored
[out, in]), which backward computes through every frozen layer so that earlier adapters get their gradients,
40 to 150 times slower (2 threads, AMD EPYC with AVX2 only: ``benchmarks/bf16_matmul_cpu.py``); bitsandbytes'
4-bit backward on CPU multiplies by its dequantized weight in the compute dtype the same way. On such a CPU,
in training, the layer's forward runs as it does, without autograd, and the input gradient is
:func:`blockwise_matmul`: W's rows upcast to float32 a block of at most :data:`ROW_BLOCK_ELEMENTS` (4 MiB) at a
time, the products accumulated in float32, the result rounded to the low dtype once (a quantized layer's rows
are dequantized to float32 a block at a time, :meth:`~dorafit.layers.quantized.QuantizedLinearOps.row_chunks`).
Products of bfloat16 (float16) values are exact in float32 and torch's own low-precision matmul accumulates in
float32 too, so the two differ only in the order of the float32 sums before the same final rounding (a 4-bit
layer's: bitsandbytes rounds its dequantized weight to the compute dtype first, this path does not). No float32
copy of a whole weight exists and nothing is cached. CUDA, float32 and CPUs with the instructions keep torch's
own products.

It is on inside :class:`FrozenInputGrads` (``dorafit train`` runs its steps in one): adapted layers use it in
their frozen product (:meth:`~dorafit.layers.base.LayerOps.frozen_product`), the frozen linear layers without an
adapter get it from a forward hook.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

#: most elements of a low-precision weight upcast to float32 at once by :func:`blockwise_matmul` (4 MiB: a small
#: transient beside the model; see docs/quantized.md for the memory it saved)
ROW_BLOCK_ELEMENTS = 1 << 20
#: whether this thread is inside :class:`FrozenInputGrads`
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("dorafit_frozen_input_grads", default=False)
#: the CPU flags (``/proc/cpuinfo``) under which torch multiplies each low-precision dtype natively
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    return frozenset(line.partition(":")[2].split())


def slow_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks the instructions for ``dtype`` products; False for float32 and where the flags
    cannot be read (not Linux: torch's own products are kept)."""
    flags = _cpu_flags()
    return dtype in NATIVE_FLAGS and flags is not None and not any(f in flags for f in NATIVE_FLAGS[dtype])


def needs_input_grad(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether a frozen product of ``x`` in ``dtype`` takes this module's path: inside :class:`FrozenInputGrads`, x
    needs a gradient (grad mode, not inside a ``torch.compile`` trace), on a CPU that multiplies ``dtype`` slowly."""
    if torch.compiler.is_compiling():  # first: a compiled graph never takes it, and dynamo cannot trace ContextVar.get
        return False
    return (_ACTIVE.get() and x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and slow_on_cpu(dtype))


def blockwise_matmul(g: Tensor, w: Tensor) -> Tensor:
    """``g @ w`` for a low-precision ``w`` [k, n] (g: [..., k]): ``sum_b g[..., b] @ w[b]`` over blocks b of w's
    rows, each block upcast to float32, accumulated in float32; float32 [..., n]."""
    k, n = w.shape
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, n))
    return blockwise_rows(g, ((start, w[start : start + step].float()) for start in range(0, k, step)), n)


def blockwise_rows(g: Tensor, row_blocks, n: int) -> Tensor:
    """``g @ W`` from W's rows given as (start, float32 block) pairs covering all k rows: float32 [..., n]."""
    g2 = g.reshape(-1, g.shape[-1])
    out = torch.zeros(g2.shape[0], n, dtype=torch.float32, device=g.device)
    for start, rows in row_blocks:
        out.addmm_(g2[:, start : start + rows.shape[0]].float(), rows)
    return out.view(*g.shape[:-1], n)


class _WithInputGrad(torch.autograd.Function):
    """``product(x)`` (a frozen linear map, computed without autograd) whose backward is ``input_grad(g)``."""

    @staticmethod
    def forward(ctx, x: Tensor, product: Callable[[Tensor], Tensor], input_grad: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.input_grad, ctx.dtype = input_grad, x.dtype
        return product(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return ctx.input_grad(grad).to(ctx.dtype), None, None


def with_input_grad(x: Tensor, product: Callable[[Tensor], Tensor], input_grad: Callable[[Tensor], Tensor]) -> Tensor:
    """``product(x)``, a frozen linear map of ``x``, with the gradient ``input_grad(g)`` to x (a fresh tensor: the
    caller may modify it in place)."""
    return _WithInputGrad.apply(x, product, input_grad)


def _frozen_hook(module: nn.Module, args, output):
    """Forward hook of a frozen linear layer without an adapter: its output with the input gradient of
    :meth:`~dorafit.layers.base.LayerOps.input_grad` (the layer's own autograd graph is dropped)."""
    from ..adapted import is_adapted
    from . import ops_for

    x = args[0] if args else None
    if is_adapted(module) or not isinstance(x, Tensor) or not isinstance(output, Tensor):
        return output
    ops = ops_for(module)
    if ops is None or not needs_input_grad(x, ops.compute_dtype(module, x)):
        return output
    detached = output.detach()
    return with_input_grad(x, lambda _: detached, functools.partial(ops.input_grad, module))


def _frozen_layers(model: nn.Module) -> list[nn.Module]:
    """The frozen linear layers (plain or quantized) without an adapter whose products this CPU computes slowly."""
    from ..adapted import is_adapted
    from . import ops_for

    layers = []
    for module in model.modules():
        ops = None if is_adapted(module) else ops_for(module)
        if ops is None or not ops.blockwise_input_grad or any(p.requires_grad for p in module.parameters()):
            continue
        if module.weight.device.type == "cpu" and slow_on_cpu(ops.compute_dtype(module, None)):
            layers.append(module)
    return layers


class FrozenInputGrads:
    """``with FrozenInputGrads(model):`` (a training step's forward and backward, as often as wanted): the frozen
    linear layers of ``model``, adapted or not, compute their input gradient as the module docstring says where
    this CPU multiplies their dtype slowly (the layers without an adapter are found once, when this is made).

    Off for a model that holds torchao NF4 or sharded (DTensor) weights: FSDP2 runs (``--distributed fsdp``, whose
    ``--quantize nf4`` is torchao's also in one process) keep torch's products, so that one process and several
    compute alike."""

    def __init__(self, model: nn.Module):
        self.enabled = not any(type(p.data).__module__.startswith(("torchao.", "torch.distributed."))
                               for p in model.parameters())
        self.layers = _frozen_layers(model) if self.enabled else []
        self.handles: list = []
        self.token = None

    def __enter__(self) -> "FrozenInputGrads":
        if self.enabled:
            self.token = _ACTIVE.set(True)
            self.handles = [layer.register_forward_hook(_frozen_hook) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.token is not None:
            _ACTIVE.reset(self.token)
            self.token = None
