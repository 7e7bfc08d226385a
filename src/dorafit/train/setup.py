"""From options to a ready model: data, task and adapted model for a new run, or a finished run's model.

:func:`prepare` turns a :class:`TrainConfig` into data, a task and an adapted model, filling in every ``None``
option with the task's, model's or method's default; :func:`load_trained` rebuilds a finished run's model
(base + adapter, kept unmerged, or the fully fine-tuned weights) with the task it was trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compiling import compile_model
from ..inject import adapted_modules, apply, get_config
from ..io import TENSORS_FILE, load_adapter, read_adapter
from ..peft_format import PEFT_TENSORS_FILE, import_peft
from ..memory import return_freed_memory
from ..quantize import quantize_model
from . import hub, precision, rundir
from .models import PRESETS as MODEL_PRESETS
from .models import LoadedModel, default_targets, resolve_model
from .options import TrainConfig, adapter_config, adapter_options, from_dict, validate
from .quantized_load import LoadOptions, loading, quantized_layer_names, torchao_nf4
from .targets import expand as expand_targets
from .tasks import all_presets, by_kind, task_type

DEFAULT_LR = {"full": 2e-5, "lora": 5e-4, "dora": 5e-4, "vera": 5e-3, "dvora": 5e-3}


@dataclass
class Setup:
    cfg: TrainConfig  # every None resolved
    task: object  # a dorafit.train.tasks.Task
    loaded: LoadedModel
    device: torch.device
    adapted: list[str]  # adapted module names ([] for full fine-tuning)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know (printed once)
    quantized: list[str] = dataclasses.field(default_factory=list)  # --quantize: the base layers it quantized

    @property
    def model(self):
        return self.loaded.model

    @property
    def data(self):
        return self.task.data


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or name == "auto" and torch.cuda.is_available() else "cpu")


def absolute_paths(options: dict) -> dict:
    """Model and task folders or files and the eval file as absolute paths (preset names stay), so that a run
    folder's config.json means the same from any working directory."""
    out = dict(options)
    for name, presets in (("model", MODEL_PRESETS), ("task", all_presets()), ("eval_file", ()),
                          ("fashion_mnist_dir", ())):
        value = out.get(name)
        if value and value not in presets and Path(value).expanduser().exists():
            out[name] = str(Path(value).expanduser().resolve())
    return out


def quantize_backend(cfg: TrainConfig) -> str | None:
    """Which library holds the quantized base: torchao's NF4 for ``--distributed fsdp --quantize nf4`` (FSDP2
    shards it; also in one process, so that such a run's base is the same however many processes train it),
    bitsandbytes otherwise."""
    if not cfg.quantize:
        return None
    return "torchao" if cfg.quantize == "nf4" and cfg.distributed == "fsdp" else "bitsandbytes"


def load_options(cfg: TrainConfig, device: torch.device, quantize: bool = True) -> LoadOptions:
    """How a run's base model is loaded (``cfg.dtype`` resolved; ``quantize=False``: in float)."""
    dtype = precision.torch_dtype(precision.resolve(cfg.dtype, device, cfg.method))
    return LoadOptions(dtype, cfg.quantize if quantize else None, device, quantize_backend(cfg) or "bitsandbytes")


def prepare(cfg: TrainConfig, model_folder: Path | None = None, device: torch.device | None = None,
            kind: str | None = None, adapt: bool = True) -> Setup:
    """Data, task and model for ``cfg``, the model seeded by ``cfg.seed`` and adapted (not yet trained).

    ``device`` overrides ``--device`` (a process of a torchrun job: its own GPU, or the CPU for FSDP2 to shard);
    ``kind`` names the task type (a stored run's), else it follows from ``--task``; ``adapt=False``: the base
    model as the run trains on it (in its dtype, quantized), without an adapter (a trained one is loaded next).
    """
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task_cls = by_kind(kind) if kind else task_type(cfg.task)
    data = task_cls.load_data(cfg.task, cfg)
    folder = model_folder or resolve_model(cfg.model)
    device = device or pick_device(cfg.device)
    options = load_options(cfg, device)
    torch.manual_seed(cfg.seed)  # a freshly initialised head and the adapter init follow from the seed
    with loading(options):
        loaded = task_cls.load_model(folder, data.extra)
    head = cfg.head if cfg.head is not None else loaded.head
    resolved = dict(
        max_length=cfg.max_length or data.max_length,
        lr=cfg.lr if cfg.lr is not None or cfg.init_from else DEFAULT_LR[cfg.method],  # --init-from: by its method
        targets=(expand_targets(cfg.targets, loaded.model, head) if cfg.targets is not None
                 else default_targets(loaded.model)),
        head=head,
        eval_limit=cfg.eval_limit if cfg.eval_limit is not None else data.eval_limit,
        image_size=data.extra.get("image_size"),  # an image task's: --image-size or the model's input size
        dtype=precision.NAMES[options.dtype],
    )
    if cfg.image_size and "image_size" not in data.extra:
        raise ValueError(f"--image-size is for image tasks; a {task_cls.kind} task reads text")
    if cfg.head and not task_cls.has_head:
        raise ValueError(f"--head is for classification tasks; a {task_cls.kind} task trains no head")
    if not resolved["targets"] and not head and cfg.method != "full" and not cfg.init_from:
        raise ValueError("--targets none adapts no module and no --head trains: nothing would learn; name the "
                         "modules to train in full with --head (e.g. --head multi_modal_projector), or give targets")
    if cfg.steps is None and cfg.epochs is None:
        resolved[data.duration[0]] = data.duration[1]
    resolved.update(absolute_paths({"model": cfg.model, "task": cfg.task, "eval_file": cfg.eval_file,
                                     "fashion_mnist_dir": cfg.fashion_mnist_dir}))
    resolved["model"] = hub.pinned(resolved["model"], folder)  # a Hub id: the commit it trains on
    cfg = validate(dataclasses.replace(cfg, **resolved))
    task = task_cls(data, loaded.tokenizer, cfg, **({"processor": loaded.processor} if loaded.processor else {}))
    loaded.model.to(device)
    hold_in_dtype(loaded.model, options.dtype, cfg.head)
    quantized = quantize_base(loaded.model, cfg)
    notes = []
    if not adapt:
        adapted = []
    elif cfg.init_from:
        cfg, adapted, notes = _adapt_from(cfg, loaded.model, data.extra.get("labels"))
    elif cfg.method == "full":
        loaded.model.requires_grad_(True)
        adapted = []
    else:
        adapted = apply(loaded.model, adapter_config(cfg, cfg.targets, cfg.head))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    if cfg.compile:
        compile_model(loaded.model)
    return Setup(cfg, task, loaded, device, adapted, notes, quantized)


def hold_in_dtype(model, dtype: torch.dtype, head: list[str] | None) -> None:
    """The base in ``dtype`` (a model transformers did not load, e.g. an image classifier, is cast now); the head
    and the adapters to come in float32 (see :mod:`dorafit.train.precision`)."""
    if dtype == torch.float32:
        return
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # transformers loaded the others in dtype (quantized ones too)
        model.to(dtype)
    precision.float32_head(model, list(head or []))
    model.dorafit_adapter_dtype = torch.float32


def quantize_base(model, cfg: TrainConfig) -> list[str]:
    """``--quantize``: the model's linear layers quantized, except its output layer and the head (``cfg.head``,
    trained in full); the names of the quantized layers. A causal LM was read quantized already (see
    :mod:`dorafit.train.quantized_load`); another model is quantized now, in place, with bitsandbytes, or with
    torchao's NF4 under ``--distributed fsdp``."""
    if not cfg.quantize:
        return []
    names = quantized_layer_names(model)
    if names:
        return_freed_memory()  # the checkpoint tensors read and quantized: give the heap back
    elif quantize_backend(cfg) == "torchao":
        names = torchao_nf4(model, skip=list(cfg.head or []))
    else:
        names = quantize_model(model, cfg.quantize, skip=list(cfg.head or []))
    if not names:
        raise ValueError(f"--quantize {cfg.quantize}: {type(model).__name__} has no nn.Linear layer to quantize "
                         "besides its output layer and head (only linear layers are quantized); drop --quantize")
    return names


def enable_gradient_checkpointing(model) -> None:
    """transformers' own: each block's activations are recomputed in backward instead of kept (non-reentrant
    checkpointing, so frozen inputs need no gradient and the adapter gradients are unchanged)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5 (the old warns)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _adapt_from(cfg: TrainConfig, model, labels: list[str] | None) -> tuple[TrainConfig, list[str], list[str]]:
    """``--init-from``: adapt ``model`` with a saved adapter (PEFT or dorafit format) and record what it set, with
    a note on what was reused. A dorafit adapter's classification head is reused only if it was trained for this
    task's labels (same names, same order); otherwise the model keeps its fresh head (trained from scratch)."""
    folder = Path(cfg.init_from)
    notes = []
    if (folder / PEFT_TENSORS_FILE).is_file():
        adapted = import_peft(model, folder, extra_trainable=cfg.head)
        if model.dorafit_extra_trainable:
            notes.append(f"--init-from: reused the PEFT adapter and its modules_to_save "
                         f"({', '.join(model.dorafit_extra_trainable)}) as they are (PEFT does not record labels)")
    elif (folder / TENSORS_FILE).is_file():
        meta = read_adapter(folder)[0]
        head = list(meta["config"].get("extra_trainable") or [])
        saved = list(((meta.get("model") or {}).get("id2label") or {}).values())
        same = not head or labels is None or saved == labels
        adapted = load_adapter(model, folder, extra=same)
        what = f"the adapter ({len(adapted)} modules)"
        if head and same:
            notes.append(f"--init-from: reused {what} and its head ({', '.join(head)})"
                         + (f", trained for these labels ({', '.join(labels)})" if labels else ""))
        elif head:
            trained_for = f"labels {', '.join(saved)}" if saved else "labels it does not record"
            notes.append(f"--init-from: reused {what}; not reused: its head ({', '.join(head)}), trained for "
                         f"{trained_for}, while this task has labels {', '.join(labels)}: a fresh head is trained")
    else:
        raise ValueError(f"--init-from {folder}: no {PEFT_TENSORS_FILE} (PEFT) or {TENSORS_FILE} (dorafit) in that "
                         "folder")
    ac = get_config(model)
    layers = dict(adapted_modules(model))
    magnitude_only = [n for n in adapted if layers[n].dorafit.update is None]
    options = adapter_options(ac)
    options.update(targets=[n for n in adapted if n not in magnitude_only], magnitude_only=magnitude_only or None)
    cfg = dataclasses.replace(
        cfg, **options, init_from=str(folder.resolve()), head=list(model.dorafit_extra_trainable),
        lr=cfg.lr if cfg.lr is not None else DEFAULT_LR[ac.method],
    )
    return cfg, adapted, notes


def stored_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    """(options, what they resolved to) of a run folder, read and validated."""
    stored, resolved = rundir.read_config(run_dir)
    stored.setdefault("dtype", "float32")  # a run written before --dtype trained in float32
    return from_dict(stored, str(run_dir / rundir.CONFIG)), resolved


def load_trained(run_dir: Path, device: str | None = None, threads: int | None = None,
                 dtype: str | None = None) -> Setup:
    """The trained model of a finished run: base model + its adapter (unmerged), or its fully fine-tuned weights,
    with the run's task (its kind as stored), on ``device`` with ``threads`` CPU threads (default: the run's);
    ``dtype``: the base's (default: the run's ``--dtype``)."""
    run_dir = Path(run_dir)
    cfg, resolved = stored_config(run_dir)
    kind = resolved.get("kind")
    cfg = dataclasses.replace(cfg, compile=False)  # evaluation of a finished run runs eager
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    if device:
        cfg = dataclasses.replace(cfg, device=device)
    if threads:
        cfg = dataclasses.replace(cfg, threads=threads)
    if cfg.method == "full":
        if not (run_dir / rundir.MODEL / "config.json").is_file():
            raise ValueError(f"{run_dir} has no trained model yet ({rundir.MODEL}/ is missing); finish it with "
                             f"dorafit train --resume {run_dir}")
        return prepare(cfg, model_folder=run_dir / rundir.MODEL, kind=kind)
    if not (run_dir / rundir.ADAPTER).is_dir():
        raise ValueError(f"{run_dir} has no trained adapter yet ({rundir.ADAPTER}/ is missing); finish it with "
                         f"dorafit train --resume {run_dir}")
    base = dataclasses.replace(cfg, init_from=None, gradient_checkpointing=False, compile=False)
    setup = prepare(base, kind=kind, adapt=False)  # the base as it was trained on (dtype, quantization)
    setup.model.requires_grad_(False)
    setup.adapted = load_adapter(setup.model, run_dir / rundir.ADAPTER)
    setup.model.to(setup.device)
    setup.cfg = cfg
    return setup
