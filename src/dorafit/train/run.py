"""One training run from options to run folder, and the way back from a run folder to the trained model.

:func:`prepare` turns a :class:`TrainConfig` into data, a task and an adapted model, filling in every ``None``
option with the task's, model's or method's default; :func:`train` runs it and writes the run folder;
:func:`load_trained` rebuilds a finished run's model (base + adapter, or the fully fine-tuned weights).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..config import AdapterConfig
from ..inject import adapted_modules, adapter_state_dict, apply, get_config, trainable_parameter_count
from ..io import TENSORS_FILE, load_adapter, save_adapter
from ..peft_format import PEFT_TENSORS_FILE, import_peft
from . import checkpoint, distributed, loop, rundir
from .data import PRESETS as TASK_PRESETS
from .data import load_task
from .evaluate import evaluate
from .models import PRESETS as MODEL_PRESETS
from .models import LoadedModel, ModelError, default_targets, load_model, resolve_model
from .options import TrainConfig, from_dict, to_dict
from .distributed import SINGLE, Group
from .snapshots import save_snapshot, snapshot_keys
from .tasks import ClassificationTask, CommonsenseTask

DEFAULT_LR = {"full": 2e-5, "lora": 5e-4, "dora": 5e-4, "vera": 5e-3, "dvora": 5e-3}
#: options that may differ between a run and its resumption: they do not change the math, but a different
#: --threads may change the order of float sums, so the resumed run then agrees to rounding, not bit for bit
RESUME_MAY_CHANGE = ("resume", "threads", "eval_batch_size", "distributed")


@dataclass
class Setup:
    cfg: TrainConfig  # every None resolved
    data: object
    task: object
    loaded: LoadedModel
    device: torch.device
    adapted: list[str]  # adapted module names ([] for full fine-tuning)

    @property
    def model(self):
        return self.loaded.model


def validate(cfg: TrainConfig) -> None:
    """Range checks that a dataclass field type cannot express; a ValueError names the option."""
    positive = ("rank", "batch_size", "grad_accum", "eval_batch_size", "checkpoint_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if cfg.steps is not None and cfg.steps < 1 or cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError("--steps must be at least 1 and --epochs above 0")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.test_size < 1:
        raise ValueError(f"--test-size must be in (0, 1), got {cfg.test_size}")
    for name in ("warmup", "save_every", "weight_decay", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise ValueError("--eval-limit must be at least 1")
    if cfg.magnitude_only and cfg.method not in ("dora", "dvora"):
        raise ValueError(f"--magnitude-only needs --method dora or dvora, not {cfg.method}")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or name == "auto" and torch.cuda.is_available() else "cpu")


def adapter_config(cfg: TrainConfig, head: list[str]) -> AdapterConfig:
    return AdapterConfig(
        method=cfg.method, r=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets),
        magnitude_only=list(cfg.magnitude_only) if cfg.magnitude_only else None, rslora=cfg.rslora,
        dropout=cfg.dropout, detach_norm=cfg.detach_norm, init=cfg.init, extra_trainable=list(head),
        vera_seed=cfg.vera_seed,
    )


def prepare(cfg: TrainConfig, model_folder: Path | None = None, device: torch.device | None = None) -> Setup:
    """Data, task and model for ``cfg``, the model seeded by ``cfg.seed`` and adapted (not yet trained).

    ``device`` overrides ``--device`` (a process of a torchrun job: its own GPU, or the CPU for FSDP2 to shard).
    """
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_task(cfg.task, cfg.eval_file, cfg.test_size, cfg.split_seed)
    folder = model_folder or resolve_model(cfg.model)
    torch.manual_seed(cfg.seed)  # a freshly initialised head and the adapter init follow from the seed
    loaded = load_model(folder, data.kind, getattr(data, "labels", None))
    resolved = dict(
        max_length=cfg.max_length or data.max_length,
        lr=cfg.lr if cfg.lr is not None or cfg.init_from else DEFAULT_LR[cfg.method],  # --init-from: by its method
        targets=cfg.targets or default_targets(loaded.model),
        head=cfg.head if cfg.head is not None else loaded.head,
    )
    if cfg.steps is None and cfg.epochs is None:
        resolved[data.duration[0]] = data.duration[1]
    resolved.update(absolute_paths({"model": cfg.model, "task": cfg.task, "eval_file": cfg.eval_file}))
    cfg = dataclasses.replace(cfg, **resolved)
    if data.kind == "classification":
        task = ClassificationTask(data, loaded.tokenizer, cfg.max_length)
    else:
        if cfg.head:
            raise ValueError("--head is for classification tasks; a causal LM trains no head")
        task = CommonsenseTask(data, loaded.tokenizer, cfg.max_length, cfg.train_on_prompt)
    device = device or pick_device(cfg.device)
    loaded.model.to(device)
    if cfg.init_from:
        cfg, adapted = _adapt_from(cfg, loaded.model)
    elif cfg.method == "full":
        loaded.model.requires_grad_(True)
        adapted = []
    else:
        adapted = apply(loaded.model, adapter_config(cfg, cfg.head))
    return Setup(cfg, data, task, loaded, device, adapted)


def _adapt_from(cfg: TrainConfig, model) -> tuple[TrainConfig, list[str]]:
    """``--init-from``: adapt ``model`` with a saved adapter (PEFT or dorafit format) and record what it set."""
    folder = Path(cfg.init_from)
    if cfg.method == "full":
        raise ValueError("--init-from loads an adapter; it does not combine with --method full")
    if (folder / PEFT_TENSORS_FILE).is_file():
        adapted = import_peft(model, folder, extra_trainable=cfg.head)
    elif (folder / TENSORS_FILE).is_file():
        adapted = load_adapter(model, folder)
    else:
        raise ValueError(f"--init-from {folder}: no {PEFT_TENSORS_FILE} (PEFT) or {TENSORS_FILE} (dorafit) in that folder")
    ac = get_config(model)
    layers = dict(adapted_modules(model))
    magnitude_only = [n for n in adapted if layers[n].dorafit.update is None]
    cfg = dataclasses.replace(
        cfg, init_from=str(folder.resolve()), method=ac.method, rank=ac.r, alpha=ac.alpha, rslora=ac.rslora,
        dropout=ac.dropout, detach_norm=ac.detach_norm, vera_seed=ac.vera_seed,
        targets=[n for n in adapted if n not in magnitude_only], magnitude_only=magnitude_only or None,
        head=list(model.dorafit_extra_trainable), lr=cfg.lr if cfg.lr is not None else DEFAULT_LR[ac.method],
    )
    return cfg, adapted


# ---- the run folder ------------------------------------------------------------------------------------------
def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = Path(cfg.model).name or "model"
    task = Path(cfg.task).stem or "task"
    return Path("runs") / f"{model}-{task}-{cfg.method}-{stamp}"


def absolute_paths(options: dict) -> dict:
    """Model and task folders or files and the eval file as absolute paths (preset names stay), so that a run
    folder's config.json means the same from any working directory."""
    out = dict(options)
    for name, presets in (("model", MODEL_PRESETS), ("task", TASK_PRESETS), ("eval_file", ())):
        value = out.get(name)
        if value and value not in presets and Path(value).expanduser().exists():
            out[name] = str(Path(value).expanduser().resolve())
    return out


def resume_config(run_dir: Path, explicit: dict) -> TrainConfig:
    """The run's stored config; options given now must agree with it."""
    explicit = absolute_paths(explicit)
    stored, _ = rundir.read_config(run_dir)
    cfg = from_dict(stored, str(run_dir / rundir.CONFIG))
    for name, value in explicit.items():
        if name not in RESUME_MAY_CHANGE and getattr(cfg, name) != value:
            raise ValueError(f"--{name.replace('_', '-')} {value!r} differs from the resumed run's "
                             f"{getattr(cfg, name)!r}; "
                             "a resumed run keeps its config (start a new run to change it)")
    changes = {name: explicit[name] for name in RESUME_MAY_CHANGE if name in explicit and name != "resume"}
    return dataclasses.replace(cfg, resume=str(run_dir), **changes)


def save_model_folder(model, tokenizer, dest: Path, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` (model and tokenizer) into a temporary folder beside ``dest``, then rename it over.

    ``state_dict`` replaces the model's own tensors (full tensors gathered from FSDP2's shards)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        model.save_pretrained(work, state_dict=state_dict)
        tokenizer.save_pretrained(work)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(work, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def load_trained(run_dir: Path, device: str | None = None) -> Setup:
    """The trained model of a finished run: base model + its adapter, or its fully fine-tuned weights."""
    run_dir = Path(run_dir)
    stored, _ = rundir.read_config(run_dir)
    cfg = from_dict(stored, str(run_dir / rundir.CONFIG))
    if device:
        cfg = dataclasses.replace(cfg, device=device)
    if cfg.method == "full":
        if not (run_dir / rundir.MODEL / "config.json").is_file():
            raise ValueError(f"{run_dir} has no trained model yet ({rundir.MODEL}/ is missing); finish it with "
                             f"dorafit train --resume {run_dir}")
        return prepare(cfg, model_folder=run_dir / rundir.MODEL)
    if not (run_dir / rundir.ADAPTER).is_dir():
        raise ValueError(f"{run_dir} has no trained adapter yet ({rundir.ADAPTER}/ is missing); finish it with "
                         f"dorafit train --resume {run_dir}")
    setup = prepare(dataclasses.replace(cfg, method="full", magnitude_only=None, init_from=None))  # the base model
    setup.loaded.model.requires_grad_(False)
    setup.adapted = load_adapter(setup.model, run_dir / rundir.ADAPTER)
    setup.model.to(setup.device)
    setup.cfg = cfg
    return setup


# ---- printing ------------------------------------------------------------------------------------------------
def format_accuracy(result: dict, before: dict | None = None) -> str:
    lines = []
    for name, t in result["tasks"].items():
        was = f"  (before {before['tasks'][name]['accuracy']:.4f})" if before and name in before["tasks"] else ""
        lines.append(f"  {name:<16} {t['accuracy']:.4f}  ({t['correct']}/{t['n']}){was}")
    if len(result["tasks"]) > 1:
        was = f"  (before {before['average']:.4f})" if before else ""
        lines.append(f"  {'average':<16} {result['average']:.4f}{was}")
    return "\n".join(lines)


def describe(setup: Setup, total: int, warmup: int, group: Group = SINGLE) -> str:
    cfg, data, model = setup.cfg, setup.data, setup.model
    trainable, everything = trainable_parameter_count(model)
    tests = sum(len(v) for v in data.test_sets().values())
    what = (f"{cfg.method} r={cfg.rank} alpha={cfg.alpha:g} on {len(setup.adapted)} modules ({', '.join(cfg.targets)})"
            if cfg.method != "full" else "full fine-tuning")
    head = f" + head {', '.join(cfg.head)}" if cfg.head and cfg.method != "full" else ""
    epochs = total * cfg.grad_accum * group.world_size * cfg.batch_size / len(data.train)
    batch = f"{cfg.batch_size}x{cfg.grad_accum} examples ({epochs:.2f} epochs)"
    if group.several:
        batch = (f"{cfg.batch_size}x{cfg.grad_accum}x{group.world_size} examples ({epochs:.2f} epochs; batch x "
                 f"accumulation x processes, {group.strategy} over {group.backend})")
    return "\n".join([
        f"model   {cfg.model} ({setup.loaded.folder}), {type(model).__name__}, on {setup.device}",
        f"task    {cfg.task}: {len(data.train)} training / {tests} test examples"
        + (f", labels {', '.join(data.labels)}" if data.kind == "classification" else f", {len(data.test)} test sets"),
        f"method  {what}{head}: {trainable:,} of {everything:,} parameters trainable "
        f"({100 * trainable / everything:.3f}%)",
        f"steps   {total} of {batch}, lr {cfg.lr:g} {cfg.schedule}, "
        f"warm-up {warmup}, seed {cfg.seed}",
    ])


def show_progress() -> bool:
    """Progress bars on a terminal (stderr), or anywhere with DORAFIT_PROGRESS=1."""
    return sys.stderr.isatty() or os.environ.get("DORAFIT_PROGRESS") == "1"


# ---- training ------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, explicit: dict) -> int:
    """One run, in this process or (under torchrun) in every process of the job; see :mod:`.distributed`."""
    group = distributed.start(cfg.distributed)
    try:
        return _train(cfg, explicit, group)
    except distributed.PeerFailed:
        return 2  # rank 0 reports why
    except distributed.LostPeer as exc:
        return _stopped(exc, group)
    finally:
        group.stop()


@dataclass
class Plan:
    """What rank 0 read from (or decided for) the run folder; every process gets a copy."""

    cfg: TrainConfig
    run_dir: Path
    resuming: bool
    has_checkpoint: bool
    before: dict | None  # the stored evaluation before training, if any


def plan_run(cfg: TrainConfig, explicit: dict, world_size: int) -> Plan:
    resuming = cfg.resume is not None
    if resuming:
        run_dir = Path(cfg.resume)
        cfg = resume_config(run_dir, explicit)
        trained_by = rundir.read_config(run_dir)[1].get("world_size", 1)
        if trained_by != world_size:
            raise ValueError(
                f"{run_dir} was trained by {trained_by} process(es) and is resumed by {world_size}; a step's data "
                f"depends on the number of processes, so resume it with {trained_by} (torchrun --nnodes ... "
                "--nproc-per-node ... with that many in all, or plain `dorafit train` for 1)")
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / rundir.CONFIG).exists():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             "or choose another --out")
    validate(cfg)
    _LOCKS[run_dir] = rundir.lock(run_dir)  # released by _train; a ValueError if another process trains it
    before = _read_json(run_dir / rundir.EVAL).get("before")
    return Plan(cfg, run_dir, resuming, resuming and checkpoint.exists(run_dir), before)


_LOCKS: dict = {}  # run folder -> the lock file this process holds


def _prepare_process(cfg: TrainConfig, group: Group) -> Setup:
    group.use_device(cfg.device)
    # several processes: a preset's cache (gemma-3-270m's converted weights) is filled once per machine
    folder = group.local_first(lambda: resolve_model(cfg.model)) if group.several else None
    setup = prepare(cfg, model_folder=folder, device=group.load_device())
    if group.several:
        setup.device = group.device
    return setup


def _train(cfg: TrainConfig, explicit: dict, group: Group) -> int:
    plan = group.on_main(lambda: plan_run(cfg, explicit, group.world_size))
    try:
        with group.collectives(plan.run_dir):
            return _run(plan, group)
    finally:
        rundir.unlock(_LOCKS.pop(plan.run_dir, None))


def _run(plan: Plan, group: Group) -> int:
    run_dir, resuming = plan.run_dir, plan.resuming
    setup = group.on_all(lambda: _prepare_process(plan.cfg, group))
    cfg, task = setup.cfg, setup.task
    model = group.wrap(setup.model)  # what the loop calls; setup.model keeps the parameter names (evaluation, files)
    say = print if group.is_main else (lambda *args, **kw: None)
    progress = show_progress() and group.is_main
    total = loop.total_steps(len(task.train), cfg.batch_size, cfg.grad_accum * group.world_size, cfg.epochs, cfg.steps)
    warmup = loop.warmup_steps(cfg.warmup, total)
    trainable, everything = trainable_parameter_count(setup.model)
    resolved = {"model_folder": str(setup.loaded.folder), "kind": setup.data.kind, "total_steps": total,
                "warmup_steps": warmup, "adapted_modules": setup.adapted, "trainable_parameters": trainable,
                "total_parameters": everything, "labels": getattr(setup.data, "labels", None),
                "dorafit_version": __version__, "torch_version": torch.__version__}
    if group.several:
        resolved["world_size"] = group.world_size
    if not resuming and group.is_main:
        rundir.write_config(run_dir, to_dict(dataclasses.replace(cfg, out=str(run_dir))), resolved)
    say(describe(setup, total, warmup, group), flush=True)

    optimizer = loop.make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = loop.make_scheduler(optimizer, cfg.schedule, warmup, total)
    before = plan.before
    if cfg.eval_before and before is None and not plan.has_checkpoint:
        before = evaluate(task, setup.model, setup.device, cfg.eval_limit, cfg.eval_batch_size, progress)
        if group.is_main:
            rundir.write_eval(run_dir, {"before": before})
    if before is not None:
        say("test accuracy before training:\n" + format_accuracy(before), flush=True)

    state = loop.LoopState(0, 0.0, [])
    if plan.has_checkpoint:
        saved = checkpoint.load(run_dir, model, optimizer, scheduler, group)
        state = loop.LoopState(saved["step"], saved["seconds"], saved["metrics"])
        say(f"resumed from the checkpoint at step {state.step} of {total}", flush=True)
    base = str(cfg.model)
    keys = snapshot_keys(setup.model, cfg.method, cfg.targets) if cfg.save_every else []

    def snapshot(step: int) -> None:
        tensors = group.full_tensors(setup.model, keys)  # None in one process: the model's own
        if group.is_main:
            save_snapshot(run_dir, step, setup.model, cfg.method, cfg.targets, base, tensors)

    if cfg.save_every and state.step == 0:
        snapshot(0)

    last_write = [time.monotonic()]
    log_every = max(1, total // 20)

    def after_step(st: loop.LoopState) -> None:
        done = st.step == total
        if cfg.save_every and (st.step % cfg.save_every == 0 or done):
            snapshot(st.step)  # before the checkpoint: a run killed between the two repeats this step on resume
        if st.step % cfg.checkpoint_every == 0 or done:
            checkpoint.save(run_dir, model, optimizer, scheduler, st.step, st.seconds, st.metrics, group)
        if group.is_main and (st.step % cfg.checkpoint_every == 0 or done or time.monotonic() - last_write[0] > 10):
            rundir.write_metrics(run_dir, st.metrics)
            last_write[0] = time.monotonic()
        if group.is_main and not progress and (st.step % log_every == 0 or done):
            say(progress_line(st, total, log_every), flush=True)  # no progress bar (not a terminal): a log line

    try:
        loop.run(model, task, optimizer, scheduler, state, total, seed=cfg.seed, batch_size=cfg.batch_size,
                 grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, device=setup.device,
                 after_step=after_step, progress=progress, group=group)
    except loop.NonFiniteLoss as exc:
        if not group.is_main:
            return 1
        rundir.write_metrics(run_dir, state.metrics)
        kept = f"the last good checkpoint (step {_checkpoint_step(run_dir)}) is in {run_dir / checkpoint.FILE}" \
            if checkpoint.exists(run_dir) else "no checkpoint was written before it"
        print(f"error: {exc}; training stopped and {kept}. Lower --lr (now {cfg.lr:g}) or raise --warmup, and "
              "start a new run.", file=sys.stderr)
        return 1

    if cfg.method == "full":
        full = group.full_tensors(setup.model, setup.model.state_dict())
        if group.is_main:
            save_model_folder(setup.model, setup.loaded.tokenizer, run_dir / rundir.MODEL, state_dict=full)
    else:
        tensors = group.full_tensors(setup.model, adapter_state_dict(setup.model))
        if group.is_main:
            save_adapter(setup.model, run_dir / rundir.ADAPTER, base_model=base, tensors=tensors)
    after = evaluate(task, setup.model, setup.device, cfg.eval_limit, cfg.eval_batch_size, progress)
    if not group.is_main:
        return 0
    result = {**after, "before": before, "step": state.step, "eval_limit": cfg.eval_limit,
              "trainable_parameters": trainable, "total_parameters": everything,
              "trainable_share": trainable / everything, "train_seconds": round(state.seconds, 1)}
    if group.several:
        result["world_size"] = group.world_size
    rundir.write_eval(run_dir, result)
    rundir.plot_loss(run_dir, state.metrics, f"{cfg.model} / {cfg.task} / {cfg.method}")
    print(f"trained {state.step} steps in {state.seconds:.0f} s; test accuracy after training:\n"
          + format_accuracy(after, before), flush=True)
    print(f"run folder: {run_dir.resolve()}", flush=True)
    return 0


def progress_line(state: loop.LoopState, total: int, window: int) -> str:
    """``step 45/300  loss 0.8123  lr 4.68e-04  1.23 steps/s`` over the last ``window`` steps."""
    recent = state.metrics[-window:]
    start = state.metrics[-window - 1]["seconds"] if len(state.metrics) > window else 0.0
    seconds = recent[-1]["seconds"] - start
    rate = f"{len(recent) / seconds:.2f} steps/s" if seconds > 0 else ""
    loss = sum(r["loss"] for r in recent) / len(recent)
    return f"step {state.step}/{total}  loss {loss:.4f}  lr {recent[-1]['lr']:.2e}  {rate}"


def _stopped(exc: distributed.LostPeer, group: Group) -> int:
    """A process of the job failed or was killed: say so (once per surviving process) and how to continue."""
    run_dir = exc.run_dir
    kept = (f"its last checkpoint (step {_checkpoint_step(run_dir)}) is in {run_dir / checkpoint.FILE}"
            if group.is_main and checkpoint.exists(run_dir) else "rank 0 holds its last checkpoint")
    print(f"error: rank {group.rank}: {exc}. The run stopped; {kept}. Continue it with as many processes: "
          f"{group.launch_command(f'--resume {run_dir}')}", file=sys.stderr, flush=True)
    return 1


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _checkpoint_step(run_dir: Path) -> int | str:
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / checkpoint.FILE), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:  # noqa: BLE001 - only used in a message
        return "?"


__all__ = ["Setup", "prepare", "train", "load_trained", "format_accuracy", "save_model_folder", "ModelError"]
