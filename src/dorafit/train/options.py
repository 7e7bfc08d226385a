"""Every option of ``dorafit train``: one dataclass, each field with its default, help text and domain.

The argparse parser is generated from :class:`TrainConfig`, so the dataclass is the only place an option is
defined. The adapter options (``--method``, ``--rank``, ``--alpha``, ...) are not restated: each is derived from
the :class:`dorafit.AdapterConfig` field it sets (default, help, choices and range), and the same table maps a
run's options onto an ``AdapterConfig`` and back (:func:`adapter_config`, :func:`adapter_options`).

Values are resolved in this order, later wins: the dataclass default, a YAML or JSON file given with
``--config``, the command line. Whatever their source, they pass :func:`validate` (types, choices, ranges, and
the rules between options) before anything is written. ``None`` in a field means "the model's, task's or
method's own default"; those are filled in when the run is prepared and written to the run folder's
``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .. import fields
from ..config import METHODS as ADAPTER_METHODS
from ..config import AdapterConfig
from ..fields import option
from ..quantize import KINDS as QUANTIZE_KINDS

METHODS = ("full",) + ADAPTER_METHODS
SCHEDULES = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
LOGGERS = ("none", "tensorboard")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_ADAPTER_FIELDS = {f.name: f for f in dataclasses.fields(AdapterConfig)}


def adapter_option(field_name: str, *, default: Any = dataclasses.MISSING, help: str | None = None, **domain) -> Any:
    """A training option that sets ``AdapterConfig.<field_name>``: its default, help and domain are that
    field's unless overridden here (e.g. ``--method`` adds ``full``, ``--targets`` defaults to the model's)."""
    source = _ADAPTER_FIELDS[field_name]
    meta = {k: source.metadata.get(k) for k in fields.DOMAIN}
    meta.update(domain)
    if default is dataclasses.MISSING:
        default = source.default if source.default is not dataclasses.MISSING else source.default_factory()
    return option(default, help or source.metadata["help"], adapter_field=field_name, **meta)


@dataclass
class TrainConfig:
    """One training run. The defaults are the embedded demo: MiniLM + DoRA on tweet sentiment."""

    # ---- what to train -----------------------------------------------------------------------------------
    model: str = option("minilm", "a preset (minilm, gemma-3-270m; efficientnet-lite0 for image tasks; "
                        "llava-gemma-270m for image-chat tasks), a local Hugging Face model folder (for image tasks: "
                        "an image classifier such as ViT or ConvNeXt; for image-chat records: a vision-language model "
                        "such as LLaVA), or "
                        "a Hugging Face Hub id ORG/NAME[@REVISION] (downloaded into the Hugging Face cache; "
                        "HF_HUB_OFFLINE=1 uses the cache only)",
                        metavar="NAME|DIR|ORG/NAME")
    task: str = option(
        "tweets",
        "a preset (tweets, bbc: classification; commonsense: multiple choice; bbc-headlines: instruction tuning; "
        "fashion-mnist: image classification), a commonsense-format data folder, a folder of class folders of "
        "PNG/JPEG images (image classification), a .jsonl/.parquet/.csv file of text,label (classification), or a "
        ".jsonl/.parquet file of instruction tuning records (Alpaca instruction/input/output, OpenAI messages, or "
        "ShareGPT conversations); either kind of records as a Hugging Face dataset hf:ORG/NAME[:SPLIT] (split "
        "default: train)",
        metavar="NAME|PATH|hf:ORG/NAME",
    )
    eval_file: Optional[str] = option(
        None, "test file (or hf:ORG/NAME:SPLIT) for a file or dataset task, or test folder (same layout) for an image "
        "folder task (default: a seeded --test-size split of the task's data)", metavar="PATH")
    test_size: float = option(0.1, "share of a .jsonl/.csv task file (or of an image folder's images) held out for "
                              "testing when --eval-file is not given", above=0, below=1)
    split_seed: int = option(0, "seed of the fixed train/test split of presets and file tasks (independent of "
                             "--seed)", minimum=0)
    max_length: Optional[int] = option(None, "tokens per example (default: the task's: tweets 64, bbc 256, files "
                                       "128, commonsense 256, instruction files 512, bbc-headlines 256)", minimum=2)
    image_size: Optional[int] = option(
        None, "image tasks: the side in pixels images are resized to (default: the model's input size, 224 for "
        "efficientnet-lite0, config.json's image_size for a Hugging Face model); smaller is much faster on a CPU, "
        "multiples of 32 keep EfficientNet's padding as trained; ViT needs the size it was trained at", minimum=32)
    fashion_mnist_dir: Optional[str] = option(
        None, "fashion-mnist: the folder of its four *-ubyte.gz files, or a folder torchvision's FashionMNIST "
        "downloaded into (default: $DORAFIT_FASHION_MNIST, else the Debian package's "
        "/usr/share/datasets/fashion-mnist)", metavar="DIR")
    train_on_prompt: bool = option(False, "causal-LM tasks: train on every token, not only on the responses")

    # ---- how to adapt ------------------------------------------------------------------------------------
    method: str = adapter_option("method", help="full (full fine-tuning), lora, dora, vera or dvora", choices=METHODS)
    rank: int = adapter_option("r")
    alpha: float = adapter_option("alpha")
    rslora: bool = adapter_option("rslora")
    targets: Optional[list[str]] = adapter_option(
        "targets", default=None, help="module names (or name suffixes) that get the adapter; with --method full, the "
        "modules --save-every snapshots (default: the model's q,k,v,up,down projections, found from the architecture; "
        "all-linear: every linear layer but the output layer and the head; none: no adapter, only --head trains)",
        metavar="NAME")
    magnitude_only: Optional[list[str]] = adapter_option("magnitude_only", metavar="NAME")
    head: Optional[list[str]] = option(
        None, "modules trained in full next to the adapter (classification default: the modules the checkpoint "
        "did not initialise, e.g. classifier, plus the pooler; a vision-language model's projector: "
        "multi_modal_projector)", metavar="NAME",
    )
    dropout: float = adapter_option("dropout")
    detach_norm: bool = adapter_option("detach_norm")
    magnitude_grad: str = adapter_option("magnitude_grad")
    init: str = adapter_option("init")
    vera_seed: int = adapter_option("vera_seed")
    quantize: Optional[str] = option(
        None, "load the frozen base quantized with bitsandbytes (QLoRA/QDoRA): nf4 or fp4 (4-bit, blocks of 64, "
        "double-quantized scales) or int8 (LLM.int8). A causal LM's checkpoint is read straight into quantized "
        "layers, never held in float; with --distributed fsdp, nf4 uses torchao's NF4 (which FSDP2 shards). Only "
        "the base's linear layers are quantized; the adapter, DoRA's magnitude and the head stay float32. Needs the "
        "quant extra: scripts/bootstrap quant",
        choices=QUANTIZE_KINDS)
    dtype: str = option(
        "auto", "the dtype the frozen base is held and computed in; the adapter, DoRA's magnitude, the head and the "
        "optimizer state stay float32. auto: bfloat16 on a CUDA GPU that supports it (float32 for --method full), "
        "float32 on a CPU (most CPUs lack bfloat16 arithmetic, so it saves memory, not time). float16 trains with "
        "loss scaling", choices=DTYPES)
    init_from: Optional[str] = option(
        None, "start from a trained adapter: a PEFT adapter folder (adapter_model.safetensors) or a dorafit one "
        "(adapter.safetensors); its config sets the method, rank, alpha, rslora, targets and dropout", metavar="DIR",
    )

    # ---- optimisation ------------------------------------------------------------------------------------
    lr: Optional[float] = option(None, "peak learning rate (default: full 2e-5, lora/dora 5e-4, vera/dvora 5e-3)",
                                 above=0)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", minimum=0)
    epochs: Optional[float] = option(None, "passes over the training data (may be fractional); excludes --steps",
                                     above=0)
    steps: Optional[int] = option(None, "optimizer steps; excludes --epochs (default when neither is given: tweets "
                                  "300 steps, bbc and bbc-headlines 1 epoch, files and commonsense 3 epochs)",
                                  minimum=1)
    batch_size: int = option(16, "examples per micro-batch", minimum=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch_size * grad_accum)",
                             minimum=1)
    warmup: float = option(0.06, "linear warm-up: a share of all steps if < 1, else a number of steps", minimum=0)
    schedule: str = option("linear", "learning-rate decay after warm-up", choices=SCHEDULES)
    seed: int = option(0, "seed of initialisation, data order and dropout (data order and dropout are a function "
                       "of seed and step, so a resumed run repeats an uninterrupted one exactly)", minimum=0)
    gradient_checkpointing: bool = option(False, "recompute each transformer block's activations in backward "
                                          "(transformers' gradient checkpointing): less memory, ~30% more time")
    compile: bool = option(False, "torch.compile the model in place (dorafit.compile_model): training steps and "
                           "evaluation run compiled (the first steps of each shape compile; DoRA traces as one "
                           "graph, no recompilation per layer)")

    # ---- evaluation --------------------------------------------------------------------------------------
    eval_limit: Optional[int] = option(None, "evaluate on at most this many test examples per test set (default: "
                                       "all; bbc-headlines 100)", minimum=1)
    eval_batch_size: int = option(32, "examples per evaluation batch", minimum=1)
    eval_before: bool = option(True, "evaluate before training too (printed and stored in eval.json)")
    max_new_tokens: Optional[int] = option(None, "instruction tasks: tokens generated per held-out example when "
                                           "evaluating (default: the task's: 64, bbc-headlines 32)", minimum=1)

    # ---- run folder and machine --------------------------------------------------------------------------
    out: Optional[str] = option(None, "run folder (default: runs/MODEL-TASK-METHOD-TIME)", metavar="DIR")
    resume: Optional[str] = option(None, "continue the run in this folder from its last checkpoint (its config is "
                                   "reused; options given here must agree with it)", metavar="RUN")
    checkpoint_every: int = option(50, "write a resumable checkpoint every N steps (and at the end)", minimum=1)
    save_every: int = option(0, "keep a snapshot of the adapter (full: the --targets weights) every N steps under "
                             "RUN/snapshots/step-N, plus at step 0 and at the end (0: none)", minimum=0)
    log: str = option("none", "also log loss, learning rate, tokens/s and evaluation metrics as TensorBoard event "
                      "files in RUN/tensorboard (metrics.jsonl is always written)", choices=LOGGERS)
    device: str = option("auto", "where to train (auto: cuda if available)", choices=DEVICES)
    threads: Optional[int] = option(None, "CPU threads for torch (default: torch's choice)", minimum=1)
    distributed: str = option("ddp", "under torchrun: ddp (a full copy of the model per process, gradients averaged) "
                              "or fsdp (FSDP2: parameters, gradients and optimizer state sharded across the "
                              "processes); global batch = batch_size x grad_accum x processes (ignored in a single "
                              "process)", choices=STRATEGIES)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: training option -> the AdapterConfig field it sets
ADAPTER_OPTIONS = {name: f.metadata["adapter_field"] for name, f in FIELDS.items() if f.metadata.get("adapter_field")}


flag = fields.flag


def validate(cfg: TrainConfig) -> TrainConfig:
    """Every option in its domain, then the rules between options; a ValueError naming the option otherwise."""
    fields.check(cfg, label=flag)
    if cfg.steps is not None and cfg.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if cfg.magnitude_only and cfg.method not in ("dora", "dvora"):
        raise ValueError(f"--magnitude-only needs --method dora or dvora, not {cfg.method}")
    if cfg.method == "full" and cfg.init_from:
        raise ValueError("--init-from loads an adapter; it does not combine with --method full")
    if cfg.quantize and cfg.method == "full":
        raise ValueError("--quantize freezes a quantized base for an adapter to train on; a quantized weight cannot "
                         "be fully fine-tuned: choose --method lora, dora, vera or dvora")
    if cfg.method == "full" and cfg.dtype in ("bfloat16", "float16"):
        raise ValueError(f"--dtype {cfg.dtype} holds a frozen base in {cfg.dtype}; --method full trains every weight "
                         "and keeps them float32: drop --dtype (or --dtype float32), or train an adapter")
    if cfg.quantize and cfg.compile:
        raise ValueError("--quantize does not combine with --compile (the quantized layers run eagerly); drop one")
    return cfg


def adapter_config(cfg: TrainConfig, targets: list[str], head: list[str]) -> AdapterConfig:
    """The :class:`AdapterConfig` a run's options describe (``targets`` and ``head`` resolved by the caller)."""
    values = {field: getattr(cfg, name) for name, field in ADAPTER_OPTIONS.items()}
    values.update(targets=list(targets), extra_trainable=list(head))
    return AdapterConfig(**values)


def adapter_options(config: AdapterConfig) -> dict[str, Any]:
    """The training options an :class:`AdapterConfig` sets (the inverse of :func:`adapter_config`)."""
    return {name: getattr(config, field) for name, field in ADAPTER_OPTIONS.items()}


# ---- the command line and config files ------------------------------------------------------------------
def _split_names(values: list) -> list[str]:
    """``--targets q_proj,v_proj k_proj`` -> [q_proj, v_proj, k_proj]."""
    return [part for v in values for part in str(v).split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one option per field; only what the user typed lands in the namespace (defaults come from
    the dataclass, after the config file). Choices and ranges are checked by :func:`validate`, so a config file
    and the command line fail with the same message."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (keys as below, - or _); "
                        "command-line options override it")
    fields.add_arguments(parser, TrainConfig, suppress_defaults=True)


def _coerce(name: str, value: Any) -> Any:
    """A config-file value as the field's type where the conversion loses nothing (an int for a float option,
    a single name or a comma-separated string for a list option); anything else is left for :func:`validate`."""
    kind, is_list, _ = fields.base_type(TrainConfig, name)
    if is_list and isinstance(value, (str, list)):
        values = value if isinstance(value, list) else [value]
        return _split_names(values) if all(isinstance(v, str) for v in values) else value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or JSON file; unknown keys are an error listing the known ones."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml, json and decoding raise different error types
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
        out[name] = _coerce(name, value)
    return out


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options typed on the command line (list options split on commas)."""
    given = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    for name, value in given.items():
        if fields.base_type(TrainConfig, name)[1] and value is not None:
            given[name] = _split_names(value)
    return given


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, options given explicitly by file or command line): defaults <- --config file <- command line.

    The result is validated; a bad value from the file is named with the file."""
    explicit: dict[str, Any] = {}
    source = None
    if getattr(args, "config", None):
        explicit.update(read_config_file(args.config))
        source = args.config
    cli = given_options(args)
    explicit.update(cli)
    try:
        return validate(TrainConfig(**explicit)), explicit
    except ValueError as exc:
        bad = next((n for n in explicit if str(exc).startswith(flag(n) + " ")), None)
        if source and bad and bad not in cli:
            raise ValueError(f"config file {source}: {exc}") from None
        raise


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any], source: str) -> TrainConfig:
    """A run folder's stored options (a run written by an earlier version lacks the newer options: their
    defaults apply). A ValueError naming ``source`` if an option is unknown or out of its domain."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}; it was written by a newer dorafit")
    try:
        return validate(TrainConfig(**{k: _coerce(k, v) for k, v in data.items()}))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
