"""Real models at real size: a bfloat16 / float16 base with float32 adapters (--dtype), and a quantized base read
straight from the checkpoint (--quantize), on a tiny random LLaMA saved in bfloat16."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dorafit.train import precision
from dorafit.train.quantized_load import LoadOptions, loading
from dorafit.train.setup import load_trained

from .cli_support import fails, make_chat_llama, make_instruction_files, read_jsonl, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("real-size")
    folder = make_chat_llama(root / "llama")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)  # stored bfloat16
    return {"root": root, "llama": folder, **make_instruction_files(root / "instruct", n=24)}


def train(data, out, *extra) -> str:
    code, stdout, err = run_cli(
        "train", "--model", data["llama"], "--task", data["messages"], "--method", "dora", "--steps", "3",
        "--batch-size", "4", "--lr", "1e-2", "--eval-limit", "2", "--max-new-tokens", "2", "--no-eval-before",
        "--threads", "1", "--out", out, *extra)
    assert code == 0, err
    return stdout


def test_the_test_model_is_stored_in_bfloat16(data):
    assert {t.dtype for t in load_file(data["llama"] / "model.safetensors").values()} == {torch.bfloat16}


def test_bfloat16_base_float32_adapter_generate_and_merge(data):
    run = data["root"] / "bf16"
    out = train(data, run, "--dtype", "bfloat16")
    assert "LlamaForCausalLM, bfloat16, on cpu" in out
    assert json.loads((run / "config.json").read_text())["config"]["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(run / "adapter" / "adapter.safetensors").values()} == {torch.float32}
    assert all(math.isfinite(row["loss"]) for row in read_jsonl(run / "metrics.jsonl"))

    setup = load_trained(run)  # the run's dtype: the base bfloat16, the adapter float32
    q = setup.model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == q.magnitude.dtype == torch.float32
    assert load_trained(run, dtype="float32").model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32

    code, text, err = run_cli("generate", run, "--prompt", "red cat", "--max-new-tokens", "3")
    assert code == 0 and text.strip(), err

    merged = data["root"] / "bf16-merged"
    code, _, err = run_cli("merge", run, "--out", merged)
    assert code == 0, err
    assert {t.dtype for t in load_file(merged / "model.safetensors").values()} == {torch.bfloat16}
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[5, 17, 300, 4000, 12, 9]])
    with torch.no_grad():
        expected = setup.model.eval()(input_ids=ids).logits.float()
        got = plain(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)  # bfloat16's 8 bits of mantissa

    code, out, err = run_cli("export", run, "--out", data["root"] / "bf16-peft")  # PEFT over the bfloat16 base
    assert code == 0 and "checked: PEFT's outputs equal dorafit's" in out, err


def test_float16_trains_with_loss_scaling(data):
    run = data["root"] / "fp16"
    train(data, run, "--dtype", "float16", "--checkpoint-every", "1")
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["loss_scale"] > 1 for r in rows)
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["scaler"]["scale"] > 1  # resumes with the scale it reached
    assert {t.dtype for t in load_file(run / "adapter" / "adapter.safetensors").values()} == {torch.float32}


def test_auto_is_float32_on_a_cpu_and_full_fine_tuning_keeps_float32(data, tmp_path):
    assert precision.resolve("auto", torch.device("cpu"), "dora") == "float32"
    line = fails("train", "--model", data["llama"], "--task", data["messages"], "--method", "full", "--dtype",
                 "bfloat16", "--out", tmp_path / "run")
    assert "--dtype bfloat16" in line and "--method full" in line
    from dorafit.train.options import FIELDS

    assert "float32 on a CPU" in FIELDS["dtype"].metadata["help"]  # what --help says of auto


# ---- a quantized base read straight from the checkpoint -----------------------------------------------------------
class Float32Weights(TorchDispatchMode):
    """Records every float32 tensor an operation creates whose shape is one of ``shapes`` (a layer's weight), but
    on the meta device (no memory: a layer built there before its quantized weight is put in)."""

    def __init__(self, shapes: set):
        super().__init__()
        self.shapes, self.seen = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) in self.shapes
                    and t.device.type != "meta"):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_load_never_holds_a_float32_weight(data, kind):
    pytest.importorskip("bitsandbytes")
    from dorafit.train.models import load_causal_lm

    with loading(LoadOptions(torch.bfloat16)):
        reference = load_causal_lm(data["llama"]).model
    linear = {n: tuple(m.weight.shape) for n, m in reference.named_modules() if type(m) is torch.nn.Linear}
    quantized = {n: s for n, s in linear.items() if n != "lm_head"}
    watch = Float32Weights(set(quantized.values()))
    with watch, loading(LoadOptions(torch.bfloat16, kind)):
        model = load_causal_lm(data["llama"]).model
    layers = {n: type(m).__name__ for n, m in model.named_modules() if n in quantized}
    assert set(layers.values()) == {"Linear4bit" if kind == "nf4" else "Linear8bitLt"} and len(layers) == 14
    assert watch.seen == []
    # the watch does see a float32 load (the way --quantize loaded before: float32 first, then quantized)
    with watch, loading(LoadOptions(torch.float32)):
        load_causal_lm(data["llama"])
    assert {shape for _, shape in watch.seen} == set(quantized.values()) - {(16, 32)}  # k/v: converted unseen


def test_a_4bit_load_never_lets_a_block_span_two_rows(data):
    """transformers' 4-bit blocks are 64 wide; the tiny LLaMA's 32-wide layers get quantize_model's blocks of 32
    (on an AVX512 CPU a block spanning two rows dequantizes another W0), its 64-wide down_proj keeps 64."""
    pytest.importorskip("bitsandbytes")
    from dorafit.train.models import load_causal_lm

    with loading(LoadOptions(torch.bfloat16, "nf4")):
        model = load_causal_lm(data["llama"]).model
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(layers) == 14 and type(model.lm_head) is torch.nn.Linear
    sizes = {n.rsplit(".", 1)[1]: m.weight.quant_state.blocksize for n, m in layers.items()}
    assert sizes == {**dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"], 32),
                     "down_proj": 64}
    assert all(m.in_features % m.weight.quant_state.blocksize == 0 for m in layers.values())
    assert {m.weight.quant_state.dtype for m in layers.values()} == {torch.bfloat16}


def test_qdora_bfloat16_run_reads_its_base_quantized(data):
    pytest.importorskip("bitsandbytes")
    run = data["root"] / "nf4-bf16"
    out = train(data, run, "--dtype", "bfloat16", "--quantize", "nf4")
    assert "14 linear layers quantized nf4 (bitsandbytes)" in out
    setup = load_trained(run)
    q = setup.model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "AdaptedLinear4bit" and q.weight.quant_state.dtype == torch.bfloat16
    assert q.lora_A.dtype == torch.float32
