"""One training run, from options to a finished run folder, in this process or in every process of a torchrun job.

    train(cfg, explicit)
      plan_run         rank 0: new or resumed run, the run folder locked for the whole run
      Run.start        every process: data, task and adapted model; config.json; the description
      Run.evaluate     before training (once per run: kept in eval.json)
      Run.restore      the checkpoint's parameters, optimizer and schedule, if resuming
      loop.run         the steps; after each: snapshot, checkpoint, metrics (Run.after_step)
      Run.finish       the adapter (or model), the evaluation after training, eval.json, the loss plot

A resumed run may raise ``--steps`` / ``--epochs`` beyond where it ended (see :func:`resume_config`).

Ctrl-C (SIGINT) or SIGTERM during the steps of a one-process run finishes the current step, writes a checkpoint,
prints the command that continues the run and exits with 130 / 143; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..files import atomic_folder, check_writable
from ..inject import adapter_state_dict, trainable_parameter_count
from ..io import save_adapter
from ..memory import return_freed_memory
from . import checkpoint, distributed, loop, precision, rundir
from . import quantized_load
from .distributed import SINGLE, Group
from .evaluate import evaluate
from .metrics_log import MetricsLog
from .options import TrainConfig, flag, to_dict, validate
from .report import describe, progress_line, show_progress
from .setup import Setup, absolute_paths, prepare, stored_config
from .snapshots import save_snapshot, snapshot_keys

#: options that may differ between a run and its resumption: they do not change the math, but a different
#: --threads may change the order of float sums, so the resumed run then agrees to rounding, not bit for bit
RESUME_MAY_CHANGE = ("resume", "threads", "eval_batch_size", "distributed", "log", "compile")
#: options a resumed run may raise: training continues past the run's end (see resume_config)
RESUME_MAY_EXTEND = ("steps", "epochs")


def train(cfg: TrainConfig, explicit: dict) -> int:
    """One run, in this process or (under torchrun) in every process of the job; see :mod:`.distributed`."""
    check_strategy(cfg, distributed.world_size())  # before joining the job (a resumed run's: in plan_run)
    group = distributed.start(cfg.distributed)
    try:
        with contextlib.ExitStack() as held:
            plan = group.on_main(lambda: plan_run(cfg, explicit, group.world_size, held))
            if plan.complete:
                return 0
            with group.collectives(plan.run_dir):
                return Run(plan, group).run()
    except distributed.PeerFailed:
        return 2  # rank 0 reports why
    except distributed.LostPeer as exc:
        return _stopped(exc, group)
    finally:
        group.stop()


# ---- planning: which run folder, new or resumed -------------------------------------------------------------
@dataclass
class Plan:
    """What rank 0 read from (or decided for) the run folder; every process gets a copy."""

    cfg: TrainConfig
    run_dir: Path
    resuming: bool
    has_checkpoint: bool
    before: dict | None  # the stored evaluation before training, if any
    extended: bool = False  # resumed with a new --steps / --epochs
    complete: bool = False  # a finished run resumed with nothing to add: nothing to do


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = Path(cfg.model).name or "model"
    task = Path(cfg.task).stem or "task"
    return Path("runs") / f"{model}-{task}-{cfg.method}-{stamp}"


def resume_config(run_dir: Path, explicit: dict) -> TrainConfig:
    """The run's stored config; options given now must agree with it, except those of RESUME_MAY_CHANGE and a
    longer duration (RESUME_MAY_EXTEND: the schedule is then planned over the new total from the resume point on;
    steps already taken keep the learning rates they had)."""
    explicit = absolute_paths(explicit)
    cfg, _ = stored_config(run_dir)
    for name, value in explicit.items():
        if name not in RESUME_MAY_CHANGE + RESUME_MAY_EXTEND and getattr(cfg, name) != value:
            raise ValueError(f"{flag(name)} {value!r} differs from the resumed run's {getattr(cfg, name)!r}; a resumed "
                             "run keeps its config (start a new run to change it)")
    changes = {name: explicit[name] for name in RESUME_MAY_CHANGE if name in explicit and name != "resume"}
    if cfg.quantize == "nf4" and (changes.get("distributed", cfg.distributed) == "fsdp") != (cfg.distributed == "fsdp"):
        raise ValueError(f"--distributed {changes['distributed']}: {run_dir} trained on a base quantized "
                         f"{'by torchao (--distributed fsdp)' if cfg.distributed == 'fsdp' else 'by bitsandbytes'}; "
                         f"resume it with --distributed {cfg.distributed}, whose base is the same")
    extend = {name: explicit[name] for name in RESUME_MAY_EXTEND if name in explicit}
    if extend:
        changes.update(steps=extend.get("steps"), epochs=extend.get("epochs"))
    return validate(dataclasses.replace(cfg, resume=str(run_dir), **changes))


def check_strategy(cfg: TrainConfig, world_size: int) -> None:
    """Options that the number of processes rules out."""
    if cfg.quantize and cfg.quantize != "nf4" and cfg.distributed == "fsdp" and world_size > 1:
        raise ValueError(f"--quantize {cfg.quantize} does not combine with --distributed fsdp: FSDP2 cannot shard "
                         "bitsandbytes' packed quantized weights; use --quantize nf4 (torchao's NF4, which FSDP2 "
                         "shards) or --distributed ddp (each process holds the quantized base)")
    if cfg.quantize == "nf4" and cfg.distributed == "fsdp" and world_size > 1 and \
            quantized_load.NF4_MAX_SHARDS % world_size:
        raise ValueError(f"--distributed fsdp --quantize nf4 shards each NF4 weight into {world_size} equal parts, "
                         f"which NF4's blocks allow for 2, 4 or 8 processes; start one of those numbers")
    if cfg.dtype == "float16" and cfg.distributed == "fsdp" and world_size > 1:
        raise ValueError("--dtype float16 does not combine with --distributed fsdp: its loss scaler would skip "
                         "overflowing steps on each process's shard separately; use --dtype bfloat16 (no loss "
                         "scaling needed) or --distributed ddp")


def plan_run(cfg: TrainConfig, explicit: dict, world_size: int, held: contextlib.ExitStack) -> Plan:
    """Rank 0: the run folder, locked (``held`` releases the lock when the run ends)."""
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
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"--out {run_dir} is a file, not a folder; choose another --out")
        if (run_dir / rundir.CONFIG).exists():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             "or choose another --out")
    check_strategy(cfg, world_size)
    check_writable(run_dir)  # now, not at the first checkpoint
    held.enter_context(rundir.locked(run_dir))  # a ValueError if another process trains it
    rundir.remove_leftovers(run_dir)  # of a process killed while writing (we hold the lock: nobody else writes)
    before = _read_json(run_dir / rundir.EVAL).get("before")
    extended = resuming and any(name in explicit for name in RESUME_MAY_EXTEND)
    plan = Plan(cfg, run_dir, resuming, resuming and checkpoint.exists(run_dir), before, extended)
    if resuming and not extended:
        plan.complete = report_if_complete(run_dir, rundir.read_config(run_dir)[1].get("total_steps"))
    return plan


def report_if_complete(run_dir: Path, total: int | None) -> bool:
    """A run evaluated after its last step (``total``) needs nothing more: say so and how to go on."""
    done = _read_json(run_dir / rundir.EVAL).get("step")
    if done is None or done != total:
        return False
    print(f"{run_dir} is complete: it trained all {done} steps and was evaluated (eval.json). Evaluate it again "
          f"with: dorafit eval {run_dir}; train it further with: dorafit train --resume {run_dir} --steps N "
          f"(N > {done})", flush=True)
    return True


# ---- stopping on a signal ---------------------------------------------------------------------------------------
class Stopped(Exception):
    """A signal asked the run to stop; the step in progress was finished and checkpointed."""

    def __init__(self, signum: int, step: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step = signum, step


@contextlib.contextmanager
def stop_on_signals(requested: list):
    """SIGINT and SIGTERM append their number to ``requested`` (the loop stops after the current step); a second
    one raises KeyboardInterrupt at once."""
    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing the current step and writing a checkpoint (send it again "
              "to stop at once)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---- the run --------------------------------------------------------------------------------------------------
class Run:
    """The work every process of a run does (rank 0 alone writes files and prints)."""

    def __init__(self, plan: Plan, group: Group = SINGLE):
        self.plan, self.group, self.run_dir = plan, group, plan.run_dir
        self.progress = show_progress() and group.is_main

    def say(self, text: str) -> None:
        if self.group.is_main:
            print(text, flush=True)

    def run(self) -> int:
        if not self.start():
            return 0
        self.evaluate_before()
        state = self.restore()
        self.log = MetricsLog(self.run_dir, state.metrics, self.cfg.log == "tensorboard", self.group.is_main)
        self.snapshot_keys = snapshot_keys(self.setup.model, self.cfg.method, self.cfg.targets) \
            if self.cfg.save_every else []
        if self.cfg.save_every and state.step == 0:
            self.snapshot(0)
        self.stop_requested: list = []
        signals = stop_on_signals(self.stop_requested) if not self.group.several else contextlib.nullcontext()
        try:
            with signals:
                loop.run(self.model, self.task, self.optimizer, self.scheduler, state, self.total, seed=self.cfg.seed,
                         batch_size=self.cfg.batch_size, grad_accum=self.cfg.grad_accum,
                         max_grad_norm=self.cfg.max_grad_norm, device=self.setup.device, after_step=self.after_step,
                         progress=self.progress, group=self.group, scaler=self.scaler)
        except loop.NonFiniteLoss as exc:
            return self.stop_non_finite(exc, state)
        except Stopped as stop:
            print(f"stopped by {stop} after step {stop.step} of {self.total}; the checkpoint is in "
                  f"{self.run_dir / checkpoint.FILE}. Continue with: dorafit train --resume {self.run_dir}",
                  file=sys.stderr, flush=True)
            return 128 + stop.signum
        finally:
            self.log.close()
        return self.finish(state)

    def start(self) -> bool:
        """Data, task and model in every process; the resolved config written (a new or extended run); the
        description. False if the run is already complete at this length."""
        group, cfg = self.group, self.plan.cfg
        self.setup: Setup = group.on_all(lambda: self._prepare(cfg))
        self.cfg, self.task = self.setup.cfg, self.setup.task
        self.model = group.wrap(self.setup.model)  # the loop's; setup.model keeps the parameter names
        self.total = loop.total_steps(len(self.task.train), self.cfg.batch_size, self.cfg.grad_accum * group.world_size,
                                      self.cfg.epochs, self.cfg.steps)
        self.warmup = loop.warmup_steps(self.cfg.warmup, self.total)
        if self.plan.resuming and self.plan.has_checkpoint:
            done = group.on_main(lambda: checkpoint.read(self.run_dir)[0]["step"])  # verified: a damaged one stops
            if self.total < done:
                raise ValueError(f"{self.run_dir} has trained {done} steps; --steps / --epochs may raise its length "
                                 f"on resume, not lower it below that (asked for {self.total} steps)")
            if done == self.total and group.on_main(lambda: report_if_complete(self.run_dir, self.total)):
                return False
        trainable, everything = trainable_parameter_count(self.setup.model)
        resolved = {"model_folder": str(self.setup.loaded.folder), "kind": self.task.kind, "total_steps": self.total,
                    "warmup_steps": self.warmup, "adapted_modules": self.setup.adapted,
                    "trainable_parameters": trainable, "total_parameters": everything,
                    "labels": self.setup.data.extra.get("labels"), **self.task.stored(),
                    "dorafit_version": __version__, "torch_version": torch.__version__}
        if group.several:
            resolved["world_size"] = group.world_size
        if group.is_main and (not self.plan.resuming or self.plan.extended):
            stored = dataclasses.replace(self.cfg, out=str(self.run_dir), resume=None)
            rundir.write_config(self.run_dir, to_dict(stored), resolved)
        self.say(describe(self.setup, self.total, self.warmup, group))
        self.optimizer = loop.make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        self.scheduler = loop.make_scheduler(self.optimizer, self.cfg.schedule, self.warmup, self.total)
        self.scaler = precision.grad_scaler(self.cfg.dtype, self.setup.device)
        return True

    def _prepare(self, cfg: TrainConfig) -> Setup:
        group = self.group
        group.use_device(cfg.device)
        # several processes: a preset's cache (gemma-3-270m's converted weights) is filled once per machine
        from .models import resolve_model

        folder = group.local_first(lambda: resolve_model(cfg.model)) if group.several else None
        if group.several:  # --dtype auto follows the device the process computes on, not the one FSDP2 loads on
            cfg = dataclasses.replace(cfg, dtype=precision.resolve(cfg.dtype, group.device, cfg.method))
        setup = prepare(cfg, model_folder=folder, device=group.load_device())
        if group.several:
            setup.device = group.device
        return setup

    def evaluate(self, name: str) -> dict:
        result, samples = evaluate(self.task, self.setup.model, self.setup.device, self.cfg.eval_limit,
                                   self.cfg.eval_batch_size, self.progress)
        if samples and self.group.is_main:
            rundir.write_samples(self.run_dir, name, samples)
        return result

    def evaluate_before(self) -> None:
        before = self.plan.before
        if self.cfg.eval_before and before is None and not self.plan.has_checkpoint:
            before = self.evaluate("before")
            if self.group.is_main:
                rundir.write_eval(self.run_dir, {"before": before})
        if before is not None:
            self.say("before training:\n" + self.task.format_result(before))
        self.before = before

    def restore(self) -> loop.LoopState:
        if not self.plan.has_checkpoint:
            return loop.LoopState(0, 0.0, [])
        saved = checkpoint.load(self.run_dir, self.model, self.optimizer, self.scheduler, self.group, self.scaler)
        self.say(f"resumed from the checkpoint at step {saved['step']} of {self.total}")
        return loop.LoopState(saved["step"], saved["seconds"], saved["metrics"])

    def snapshot(self, step: int) -> None:
        tensors = self.group.full_tensors(self.setup.model, self.snapshot_keys)  # None in one process
        if self.group.is_main:
            save_snapshot(self.run_dir, step, self.setup.model, self.cfg.method, self.cfg.targets, str(self.cfg.model),
                          tensors)

    def after_step(self, state: loop.LoopState) -> None:
        cfg, done = self.cfg, state.step == self.total
        if cfg.save_every and (state.step % cfg.save_every == 0 or done):
            self.snapshot(state.step)  # before the checkpoint: a run killed between the two repeats this step
        stopping = bool(self.stop_requested) and not done
        at_checkpoint = state.step % cfg.checkpoint_every == 0 or done or stopping
        if at_checkpoint:
            checkpoint.save(self.run_dir, self.model, self.optimizer, self.scheduler, state.step, state.seconds,
                            state.metrics, self.group, self.scaler)
        self.log.step(state.metrics[-1], force_write=at_checkpoint)
        window = max(1, self.total // 20)
        if not self.progress and (state.step % window == 0 or done):
            self.say(progress_line(state, self.total, window))  # no progress bar (not a terminal): a log line
        if stopping:
            raise Stopped(self.stop_requested[0], state.step)

    def stop_non_finite(self, exc: loop.NonFiniteLoss, state: loop.LoopState) -> int:
        if not self.group.is_main:
            return 1
        rundir.write_metrics(self.run_dir, state.metrics)
        kept = (f"the last good checkpoint (step {checkpoint.step_of(self.run_dir)}) is in "
                f"{self.run_dir / checkpoint.FILE}" if checkpoint.exists(self.run_dir)
                else "no checkpoint was written before it")
        print(f"error: {exc}; training stopped and {kept}. Lower --lr (now {self.cfg.lr:g}) or raise --warmup, and "
              "start a new run.", file=sys.stderr)
        return 1

    def finish(self, state: loop.LoopState) -> int:
        """Save the trained adapter (or model), evaluate, write eval.json and the loss plot, print the result."""
        group, setup, cfg = self.group, self.setup, self.cfg
        if cfg.method == "full":
            full = group.full_tensors(setup.model, setup.model.state_dict())
            if group.is_main:
                save_model_folder(setup.model, setup.loaded.tokenizer, self.run_dir / rundir.MODEL, state_dict=full,
                                  processor=setup.loaded.processor,
                                  chat_template=self.task.stored().get("chat_template"))
        else:
            tensors = group.full_tensors(setup.model, adapter_state_dict(setup.model))
            if group.is_main:
                save_adapter(setup.model, self.run_dir / rundir.ADAPTER, base_model=str(cfg.model), tensors=tensors)
        release_optimizer(self.optimizer)  # the checkpoint holds its state; evaluation needs the memory more
        after = self.evaluate("after")
        if not group.is_main:
            return 0
        self.log.evaluation(after, state.step)
        self.log.close()
        trainable, everything = trainable_parameter_count(setup.model)
        result = {**after, "before": self.before, "step": state.step, "eval_limit": cfg.eval_limit,
                  "trainable_parameters": trainable, "total_parameters": everything,
                  "trainable_share": trainable / everything, "train_seconds": round(state.seconds, 1)}
        if group.several:
            result["world_size"] = group.world_size
        rundir.write_eval(self.run_dir, result)
        rundir.plot_loss(self.run_dir, state.metrics, f"{cfg.model} / {cfg.task} / {cfg.method}")
        self.say(f"trained {state.step} steps in {state.seconds:.0f} s; after training:\n"
                 + self.task.format_result(after, self.before))
        self.say(f"run folder: {self.run_dir.resolve()}")
        return 0


def release_optimizer(optimizer) -> None:
    """Drop the optimizer's state (AdamW's two moments: twice the trainable parameters, float32) once training is
    over, so that the evaluation after it does not run on top of it. The state stays in the checkpoint."""
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    return_freed_memory()


def save_model_folder(model, tokenizer, dest: Path, state_dict: dict | None = None,
                      chat_template: str | None = None, processor=None) -> Path:
    """``save_pretrained`` (model and tokenizer, or a vision-language model's ``processor``: its tokenizer and
    image processor) into a temporary folder beside ``dest``, then rename it over
    (:func:`dorafit.files.atomic_folder`: the files get the umask's permissions).

    ``state_dict`` replaces the model's own tensors (full tensors gathered from FSDP2's shards);
    ``chat_template`` is saved with the tokenizer (the template a run was trained with)."""
    with atomic_folder(dest) as work:
        model.save_pretrained(work, state_dict=state_dict)
        if chat_template:
            tokenizer.chat_template = chat_template
            if processor is not None:
                processor.chat_template = chat_template
        (processor or tokenizer).save_pretrained(work)
    return Path(dest)


def _stopped(exc: distributed.LostPeer, group: Group) -> int:
    """A process of the job failed or was killed: say so (once per surviving process) and how to continue."""
    run_dir = exc.run_dir
    kept = (f"its last checkpoint (step {checkpoint.step_of(run_dir)}) is in {run_dir / checkpoint.FILE}"
            if group.is_main and checkpoint.exists(run_dir) else "rank 0 holds its last checkpoint")
    print(f"error: rank {group.rank}: {exc}. The run stopped; {kept}. Continue it with as many processes: "
          f"{group.launch_command(f'--resume {run_dir}')}", file=sys.stderr, flush=True)
    return 1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


__all__ = ["Plan", "Run", "train", "save_model_folder"]
