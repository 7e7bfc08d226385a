"""One run on several processes: torch.distributed under ``torchrun``, with DDP (default) or FSDP2.

``torchrun --nproc-per-node N -m dorafit train ...`` starts N processes; :func:`start` joins them into a
:class:`Group` (backend ``gloo`` on CPU; on a CUDA machine ``cpu:gloo,cuda:nccl``: tensors on the GPU go
through NCCL). One process (no torchrun, or a world of 1) gets :data:`SINGLE`, whose methods hand their input
back untouched, so the single-process run is the plain one.

What the processes share and what each holds, for W processes and K = ``--grad-accum``:

* data: every process knows the same seeded order (:class:`dorafit.train.loop.DataOrder`); in step s process r
  runs micro-batches ``(s K + k) W + r`` for k < K. A step's global batch is batch_size x K x W examples and its
  loss is the mean of its K W micro-batch losses, exactly the loss of one process with ``--grad-accum K W``.
* gradients: DDP all-reduces (averages) them after the last micro-batch of a step; FSDP2 reduce-scatters them.
* parameters: DDP keeps a full copy in each process. FSDP2 (``--distributed fsdp``) keeps 1/W of every
  parameter, gradient and optimizer state, and all-gathers a block's full parameters just before the block's
  forward, so an adapted layer computes with its full weight W0 [out, in] and DoRA's norm ``||W0 + P Q||`` is
  taken over full rows, never over a shard.
* files: only rank 0 reads and writes the run folder (no shared file system is needed); what it reads is
  sent to the others. Checkpoints and adapters hold full tensors, gathered from FSDP2's shards.
* dropout: seeded by (seed, step, rank), so the processes draw different masks.

Small Python values (the resolved config, error messages) travel with ``broadcast_object_list`` /
``all_gather_object``, i.e. pickled between the job's own processes; files are never unpickled.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor, nn

from .options import STRATEGIES

T = TypeVar("T")
#: how gloo and NCCL word a failed collective whose peer is gone
_TRANSPORT_FAILURE = re.compile(r"gloo|NCCL|[Cc]onnection (reset|closed|refused)|Broken pipe|[Tt]imed? ?out")


class PeerFailed(ValueError):
    """Raised on ranks other than 0 when the run cannot go on; rank 0 reports the reason, they stay quiet."""


class LostPeer(RuntimeError):
    """This process cannot go on: another process of the job died or was killed (``run_dir``: the run)."""

    def __init__(self, message: str, run_dir):
        super().__init__(message)
        self.run_dir = run_dir


class _Terminated(BaseException):
    """SIGTERM, sent by torchrun to the other processes when one fails."""


@dataclass
class Group:
    """This process's place in the job, and the operations that differ between one and several processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "single"  # "single", "ddp" or "fsdp"
    backend: str = ""
    device: torch.device = torch.device("cpu")  # where this process computes (set by use_device)
    broken: bool = False  # a peer was lost

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    # ---- agreeing on decisions ------------------------------------------------------------------------------
    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 only (it reads the run folder); every process gets its result or its error."""
        if not self.several:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        error = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except (ValueError, OSError) as exc:
                error, box[0] = exc, ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise PeerFailed(box[0][1])
        return box[0][1]

    def on_all(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by every process; if it fails anywhere, every process stops and rank 0 says why."""
        if not self.several:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        try:
            result = fn()
        except (ValueError, OSError) as exc:
            error = exc
        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else str(error))
        failed = [r for r, e in enumerate(errors) if e is not None]
        if not failed:
            return result
        if not self.is_main:
            raise PeerFailed(errors[failed[0]])
        if error is not None and len(failed) == self.world_size and len(set(errors)) == 1:
            raise error  # the same problem everywhere: report it as a single process would
        raise ValueError("; ".join(f"rank {r}: {errors[r]}" for r in failed))

    def local_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on each machine's local rank 0, then on its other processes (fills a per-machine cache once)."""
        if not self.several:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        for first in (True, False):
            if (self.local_rank == 0) == first:
                try:
                    result = fn()
                except (ValueError, OSError) as exc:
                    error = exc
            if first:
                dist.barrier()
        if error is not None:
            raise error
        return result

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes (float64)."""
        if not self.several:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---- devices and model wrapping -------------------------------------------------------------------------
    def use_device(self, name: str) -> torch.device | None:
        """``--device`` resolved for this process (cuda:LOCAL_RANK); None in a single process (prepare decides)."""
        if not self.several:
            return None
        cuda = name == "cuda" or name == "auto" and torch.cuda.is_available()
        if cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if cuda and self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {self.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             "start at most that many processes per node (torchrun --nproc-per-node)")
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        return self.device

    def load_device(self) -> torch.device | None:
        """Where :func:`dorafit.train.setup.prepare` puts the model: FSDP2 shards it from the CPU onto the devices."""
        if not self.several:
            return None
        return torch.device("cpu") if self.strategy == "fsdp" else self.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model the training loop calls: DDP(model), the model sharded in place by FSDP2, or the model."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model.to(self.device), device_ids=ids, forward_sync_buffers=False)
        if self.strategy == "fsdp":
            return shard(model, self.device, self.world_size)
        return model

    @staticmethod
    def inner(model: nn.Module) -> nn.Module:
        """The model under its own parameter names (DDP's ``.module``); FSDP2 keeps the names."""
        from torch.nn.parallel import DistributedDataParallel

        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model: nn.Module, last: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step (gradients accumulate)."""
        if self.strategy == "ddp" and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def collectives(self, run_dir):
        """Within the block, a failed collective or torchrun's SIGTERM raises :class:`LostPeer`."""
        if not self.several:
            yield
            return
        import signal

        import torch.distributed as dist

        def terminate(signum, frame):
            raise _Terminated()

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            yield
        except RuntimeError as exc:  # gloo and NCCL report a dead peer as RuntimeError (or its subclass DistError)
            if not (isinstance(exc, dist.DistError) or _TRANSPORT_FAILURE.search(str(exc))):
                raise
            self.broken = True
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo: "[file:line] What. Advice."
            raise LostPeer(f"lost contact with the other processes ({reason}): one of them failed or was killed",
                           run_dir) from None
        except _Terminated:
            self.broken = True
            raise LostPeer("stopped by torchrun because another process of the job failed or was killed",
                           run_dir) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    # ---- gathering full tensors -----------------------------------------------------------------------------
    def full_tensors(self, model: nn.Module, keys) -> dict[str, Tensor] | None:
        """The state-dict entries ``keys`` of ``model`` as full CPU tensors on rank 0 ({} elsewhere).

        Every process must call it (under FSDP2 each ``DTensor.full_tensor()`` is an all-gather). None in a
        single process: the caller reads the model itself.
        """
        if not self.several:
            return None
        from torch.distributed.tensor import DTensor

        wanted = set(keys)
        out = {}
        for key, value in self.inner(model).state_dict().items():
            if key in wanted:
                value = value.full_tensor() if isinstance(value, DTensor) else value
                if self.is_main:
                    out[key] = value.detach().cpu().contiguous()
        return out

    def training_state(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """(trainable parameters by name, optimizer state dict keyed by parameter name), full, on rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        params = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        names = [n for n, p in self.inner(model).named_parameters() if p.requires_grad]  # the optimizer's order
        return {n: params[n] for n in names if n in params}, optim

    def restore_training_state(self, model: nn.Module, optimizer, params: dict, optim: dict) -> None:
        """Load rank 0's full ``params`` and ``optim`` (as from :meth:`training_state`) into every process."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, params if self.is_main else {}, options=options)
        set_optimizer_state_dict(model, optimizer, optim if self.is_main else {}, options=options)

    def launch_command(self, args: str) -> str:
        """The torchrun command line that starts this job's shape again with ``dorafit train ARGS``."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        nodes = self.world_size // max(local, 1)
        shape = f"--standalone --nproc-per-node {local}"
        if nodes > 1:
            shape = (f"--nnodes {nodes} --nproc-per-node {local} --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
                     "(on each node)")
        return f"torchrun {shape} -m dorafit train {args}"

    def stop(self) -> None:
        """Leave the job (not after a lost peer: the process group cannot be shut down cleanly then)."""
        if self.several and not self.broken:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Group()


def world_size() -> int:
    """How many processes the torchrun job this process belongs to has (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(strategy: str) -> Group:
    """Join the torchrun job this process belongs to; :data:`SINGLE` when there is none (or it has one process)."""
    world = world_size()
    if world <= 1:
        return SINGLE
    if strategy not in STRATEGIES:
        raise ValueError(f"--distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return Group(rank, world, local, strategy, backend)


# ---- FSDP2 --------------------------------------------------------------------------------------------------
def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (children of its outermost ``nn.ModuleList``s: transformer layers)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            for child in module:
                inside.update(id(m) for m in child.modules())
                if any(True for _ in child.parameters()):
                    found.append(child)
    return found


def shard(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2 in place: ``fully_shard`` each block, then the root (embeddings, head, the rest).

    Adapted layers stop caching DoRA's norm in eval mode: FSDP2 re-gathers parameters into storage it may
    reuse, and that cache is keyed on tensor versions and addresses.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..adapted import is_adapted

    for module in model.modules():
        if is_adapted(module):
            module.dorafit.cache_norm = False
            module.dorafit.caches.clear()
    mesh = init_device_mesh(device.type, (world_size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
