"""Every option of ``dorafit train``: one dataclass, each field with its default and help text.

The argparse parser is generated from :class:`TrainConfig`, so the dataclass is the only place an option is
defined. Values are resolved in this order, later wins: the dataclass default, a YAML or JSON file given with
``--config``, the command line. ``None`` in a field means "the model's, task's or method's own default"; those are
filled in by :func:`dorafit.train.run.resolve` and written to the run folder's ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

METHODS = ("full", "lora", "dora", "vera", "dvora")
SCHEDULES = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")


def opt(default: Any, help: str, *, choices: tuple | None = None, metavar: str | None = None, **kw) -> Any:
    """A dataclass field carrying its command-line help (and choices) as metadata."""
    meta = {"help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """One training run. The defaults are the embedded demo: MiniLM + DoRA on tweet sentiment, a few minutes on CPU."""

    # ---- what to train -----------------------------------------------------------------------------------
    model: str = opt("minilm", "a preset (minilm, gemma-3-270m) or a local Hugging Face model folder",
                     metavar="NAME|DIR")
    task: str = opt(
        "tweets",
        "a preset (tweets, bbc, commonsense), a commonsense-format data folder, or a .jsonl/.csv file of text,label",
        metavar="NAME|PATH",
    )
    eval_file: Optional[str] = opt(
        None, "test file for a .jsonl/.csv task (default: a seeded --test-size split of the task file)", metavar="PATH"
    )
    test_size: float = opt(0.1, "share of a .jsonl/.csv task file held out for testing when --eval-file is not given")
    split_seed: int = opt(0, "seed of the fixed train/test split of tweets, bbc and file tasks (independent of --seed)")
    max_length: Optional[int] = opt(None, "tokens per example (default: the task's: tweets 64, bbc 256, files 128, "
                                    "commonsense 256)")
    train_on_prompt: bool = opt(False, "commonsense: also train on the instruction tokens, not only the response")

    # ---- how to adapt ------------------------------------------------------------------------------------
    method: str = opt("dora", "full (full fine-tuning), lora, dora, vera or dvora", choices=METHODS)
    rank: int = opt(8, "rank r of the update (VeRA/DVoRA: rank of the shared random projections)")
    alpha: float = opt(16.0, "LoRA scale numerator: s = alpha / r (alpha / sqrt(r) with --rslora)")
    rslora: bool = opt(False, "rank-stabilised scale alpha / sqrt(r)")
    targets: Optional[list[str]] = opt(
        None, "module names (or name suffixes) that get the adapter; with --method full, the modules --save-every "
        "snapshots (default: the model's q,k,v,up,down projections)", metavar="NAME",
    )
    magnitude_only: Optional[list[str]] = opt(
        None, "dora/dvora: modules that get only a trainable magnitude (paper Table 6)", metavar="NAME"
    )
    head: Optional[list[str]] = opt(
        None, "classification: modules trained in full next to the adapter (default: the modules the checkpoint "
        "did not initialise, e.g. classifier, plus the pooler)", metavar="NAME",
    )
    dropout: float = opt(0.0, "dropout on the adapter input")
    detach_norm: bool = opt(True, "DoRA: treat the weight norm as a constant in backward (paper section 4.3)")
    init: str = opt("kaiming", "init of lora_A", choices=("kaiming", "gaussian"))
    vera_seed: int = opt(0, "seed of VeRA's shared frozen projections")
    init_from: Optional[str] = opt(
        None, "start from a trained adapter: a PEFT adapter folder (adapter_model.safetensors) or a dorafit one "
        "(adapter.safetensors); its config sets the method, rank, alpha, rslora, targets and dropout", metavar="DIR",
    )

    # ---- optimisation ------------------------------------------------------------------------------------
    lr: Optional[float] = opt(None, "peak learning rate (default: full 2e-5, lora/dora 5e-4, vera/dvora 5e-3)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    epochs: Optional[float] = opt(None, "passes over the training data (may be fractional); excludes --steps")
    steps: Optional[int] = opt(None, "optimizer steps; excludes --epochs (default when neither is given: tweets 300 "
                               "steps, bbc 1 epoch, files and commonsense 3 epochs)")
    batch_size: int = opt(16, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step (effective batch = batch_size * grad_accum)")
    warmup: float = opt(0.06, "linear warm-up: a share of all steps if < 1, else a number of steps")
    schedule: str = opt("linear", "learning-rate decay after warm-up", choices=SCHEDULES)
    seed: int = opt(0, "seed of initialisation, data order and dropout (data order and dropout are a function of "
                    "seed and step, so a resumed run repeats an uninterrupted one exactly)")

    # ---- evaluation --------------------------------------------------------------------------------------
    eval_limit: Optional[int] = opt(None, "evaluate on at most this many test examples per task (default: all)")
    eval_batch_size: int = opt(32, "examples per evaluation batch")
    eval_before: bool = opt(True, "evaluate before training too (printed and stored in eval.json)")

    # ---- run folder and machine --------------------------------------------------------------------------
    out: Optional[str] = opt(None, "run folder (default: runs/MODEL-TASK-METHOD-TIME)", metavar="DIR")
    resume: Optional[str] = opt(None, "continue the run in this folder from its last checkpoint (its config is "
                                "reused; options given here must agree with it)", metavar="RUN")
    checkpoint_every: int = opt(50, "write a resumable checkpoint every N steps (and at the end)")
    save_every: int = opt(0, "keep a snapshot of the adapter (full: the --targets weights) every N steps under "
                          "RUN/snapshots/step-N, plus at step 0 and at the end (0: none)")
    device: str = opt("auto", "where to train (auto: cuda if available)", choices=DEVICES)
    threads: Optional[int] = opt(None, "CPU threads for torch (default: torch's choice)")
    distributed: str = opt("ddp", "under torchrun: ddp (a full copy of the model per process, gradients averaged) or "
                           "fsdp (FSDP2: parameters, gradients and optimizer state sharded across the processes); "
                           "global batch = batch_size x grad_accum x processes (ignored in a single process)",
                           choices=STRATEGIES)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(name: str) -> tuple[type, bool]:
    """(element type, is_list) of a field, with Optional stripped."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _split_names(values: list[str]) -> list[str]:
    """``--targets q_proj,v_proj k_proj`` -> [q_proj, v_proj, k_proj]."""
    return [part for v in values for part in str(v).split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field; defaults are SUPPRESSed so that only what the user typed lands in the namespace."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (keys as below, - or _); "
                        "command-line options override it")
    for name, f in FIELDS.items():
        kind, is_list = _base_type(name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if "default" not in help_text:  # help that explains its own default says it in words
            help_text += f" (default: {'none' if default is None else default})"
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = f.metadata["metavar"] or {int: "N", float: "X"}.get(kind, "VALUE")
        if is_list:
            parser.add_argument(flag, nargs="+", type=kind, **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)


def _coerce(name: str, value: Any, source: str) -> Any:
    """A config-file value converted to the field's type; a clear error if it cannot be."""
    kind, is_list = _base_type(name)
    if value is None:
        return None
    try:
        if is_list:
            values = value if isinstance(value, list) else [value]
            return _split_names([kind(v) for v in values])
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind is float and isinstance(value, bool) or kind is int and isinstance(value, float):
            raise ValueError(f"expected {kind.__name__}")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: option {name!r} = {value!r} is invalid: {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or JSON file; unknown keys are an error listing the known ones."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different error types
        raise ValueError(f"config file {path} cannot be parsed: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"config file {path}: unknown option {key!r}; known: {', '.join(FIELDS)}")
        out[name] = _coerce(name, value, str(path))
    return out


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options typed on the command line (list options split on commas)."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    for name in given:
        if _base_type(name)[1] and given[name] is not None:
            given[name] = _split_names(given[name])
    return given


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, options given explicitly by file or command line): defaults <- --config file <- command line."""
    explicit: dict[str, Any] = {}
    if getattr(args, "config", None):
        explicit.update(read_config_file(args.config))
    explicit.update(given_options(args))
    return TrainConfig(**explicit), explicit


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any], source: str) -> TrainConfig:
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
    return TrainConfig(**{k: _coerce(k, v, source) for k, v in data.items()})
