"""QLoRA/QDoRA end to end: ``dorafit train --quantize``, the run folder reloaded on the same quantized base by
``eval`` and ``generate``, ``merge`` writing a float model that predicts what the quantized adapted model
predicts, export to PEFT and PEFT's own bitsandbytes layers computing the same outputs, and the refusals.

The tiny LLaMA has layers of both widths (32 inputs: no multiple of QLoRA's block size 64; 64 inputs), and the
whole module runs with bitsandbytes' 4-bit dequantization computed as its AVX512 CPU kernel does (it reads the
scales of the former wrongly), so that these runs are the same on every CPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import dorafit
from dorafit.layers import ops_for
from dorafit.quantize import quantize_model
from dorafit.train.setup import load_trained

from .cli_support import assets, run_cli  # noqa: F401 (fixture)
from .conftest import randomize_adapter
from .quant_support import emulate_avx512_dequantize

pytest.importorskip("bitsandbytes")

TRAIN = ("--method", "dora", "--rank", 4, "--lr", 1e-2, "--batch-size", 8, "--seed", 1, "--eval-limit", 3,
         "--max-new-tokens", 4, "--threads", 1, "--steps", 4)


@pytest.fixture(scope="module", autouse=True)
def avx512_kernel():
    with pytest.MonkeyPatch.context() as patch:
        emulate_avx512_dequantize(patch)
        yield


@pytest.fixture(scope="module")
def qdora_run(tmp_path_factory, assets):  # noqa: F811
    """An nf4 QDoRA instruction run on the tiny LLaMA, and its merged float folder."""
    root = tmp_path_factory.mktemp("qdora")
    run = root / "run"
    code, out, err = run_cli("train", "--model", assets["chatml_llama"], "--task", assets["messages"], "--out", run,
                             "--quantize", "nf4", *TRAIN)
    assert code == 0, err
    code, merged_out, err = run_cli("merge", run, "--out", root / "merged")
    assert code == 0, err
    return {"run": run, "out": out, "merged": root / "merged", "merge_out": merged_out}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_train_quantizes_the_frozen_base_and_records_it(qdora_run):
    run = qdora_run["run"]
    assert "linear layers quantized nf4 (bitsandbytes)" in qdora_run["out"]
    assert json.loads((run / "config.json").read_text())["config"]["quantize"] == "nf4"
    setup = load_trained(run)
    model = setup.model
    adapted = dict(dorafit.adapted_modules(model))
    assert adapted and all(layer.dorafit.ops.quantized for layer in adapted.values())
    assert all(layer.magnitude.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
               for layer in adapted.values())
    # the output layer (tied to the embeddings) and the embeddings stay float
    assert ops_for(model.get_output_embeddings()).quantized is False
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_eval_reloads_the_same_quantized_base(qdora_run):
    run = qdora_run["run"]
    stored = json.loads((run / "eval.json").read_text())["tasks"]["messages"]["loss"]
    code, out, err = run_cli("eval", run)
    assert code == 0, err
    assert f"loss {stored:.4f}" in out


def test_merge_writes_a_float_model_that_predicts_what_the_quantized_adapted_model_predicts(qdora_run):
    from transformers import AutoModelForCausalLM

    assert "checked: the merged model predicts what the adapted model predicts" in qdora_run["merge_out"]
    config = json.loads((qdora_run["merged"] / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(qdora_run["merged"]).eval()
    assert not any(ops_for(m) is not None and ops_for(m).quantized for m in merged.modules())
    adapted = load_trained(qdora_run["run"]).model.eval()
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=1e-4, atol=1e-4)


def test_generate_from_the_run_equals_generate_from_the_merged_folder(qdora_run):
    args = ("--prompt", "hello there", "--max-new-tokens", 6)
    code_run, out_run, err = run_cli("generate", qdora_run["run"], *args)
    assert code_run == 0, err
    code_merged, out_merged, err = run_cli("generate", qdora_run["merged"], *args)
    assert code_merged == 0, err
    assert out_run.strip() and out_run == out_merged


@pytest.mark.parametrize("options,expected", [
    (("--method", "full"), "--quantize freezes a quantized base"),
    (("--compile",), "--quantize does not combine with --compile"),
    (("--quantize", "int4"), "--quantize must be one of nf4, fp4, int8"),
])
def test_refusals(tmp_path, assets, options, expected):  # noqa: F811
    args = ["train", "--model", assets["chatml_llama"], "--task", assets["messages"], "--out", tmp_path / "run",
            "--quantize", "nf4", "--steps", 1, *options]
    code, _, err = run_cli(*args)
    assert code == 2 and f"error: {expected}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_on_a_4bit_base_exports_to_peft_with_the_same_outputs(assets, method, tmp_path):  # noqa: F811
    """PEFT loads the exported adapter onto the same bitsandbytes 4-bit base (its own Linear4bit LoRA/DoRA
    layers) and computes what dorafit computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets["chatml_llama"]).eval()
    quantize_model(base, "nf4")
    assert base.is_loaded_in_4bit  # as transformers marks a model it loads with BitsAndBytesConfig(load_in_4bit)
    ours = copy.deepcopy(base)
    dorafit.apply(ours, dorafit.AdapterConfig(method=method, r=4, alpha=8.0, targets=["q_proj", "v_proj", "up_proj"]))
    randomize_adapter(ours)
    dorafit.export_peft(ours, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("peft.tuners.lora.bnb")  # PEFT's own bitsandbytes layer
    ids = torch.randint(5, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    ours.eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), rtol=1e-4, atol=1e-4)


def test_serve_shares_one_quantized_base_and_answers_as_generate_does(qdora_run, assets):  # noqa: F811
    import threading

    from dorafit.generation import SamplingOptions
    from dorafit.serving.engine import Request
    from dorafit.serving.load import build_served

    base, adapter = str(assets["chatml_llama"]), f"q={qdora_run['run']}"
    with pytest.raises(ValueError, match="trained on the base quantized nf4; serve it --quantize nf4"):
        build_served(base, [adapter])
    served = build_served(base, [adapter], quantize="nf4")
    layers = dict(dorafit.adapted_modules(served.engine.model))
    assert layers and all(layer.dorafit.ops.quantized for layer in layers.values())
    tokens, done = [], threading.Event()

    def on_token(token, reason):
        tokens.append(token) if reason is None else done.set()

    prompt = served.formats["q"].prompt_ids([{"role": "user", "content": "hello there"}])
    served.engine.start()
    try:
        served.engine.submit(Request(prompt, "q", SamplingOptions(max_new_tokens=6), on_token=on_token))
        assert done.wait(120)
    finally:
        served.engine.stop()
    code, printed, err = run_cli("generate", qdora_run["run"], "--prompt", "hello there", "--max-new-tokens", 6)
    assert code == 0, err
    assert served.engine.tokenizer.decode(tokens, skip_special_tokens=True).strip() == printed.strip()


def test_analyze_refuses_a_quantized_run_clearly(qdora_run, tmp_path):
    code, _, err = run_cli("analyze", qdora_run["run"], "--out", tmp_path / "analysis")
    assert code == 2 and "quantized nf4; dorafit analyze reads float weights" in err and "Traceback" not in err


def test_a_head_named_by_suffix_stays_float_and_trains(tmp_path, assets):  # noqa: F811
    run = tmp_path / "cls"
    code, out, err = run_cli("train", "--model", assets["bert"], "--task", assets["jsonl"], "--out", run,
                             "--quantize", "nf4", "--head", "classifier", "pooler", "--steps", 2, "--batch-size", 4,
                             "--eval-limit", 4, "--threads", 1)
    assert code == 0, err
    model = load_trained(run).model
    assert not ops_for(model.get_submodule("bert.pooler.dense")).quantized
    assert ops_for(model.get_submodule("bert.encoder.layer.0.attention.output.dense")).quantized
    assert model.get_submodule("bert.pooler.dense").weight.dtype == torch.float32


def test_merge_leaves_no_quantized_layer_even_when_the_adapter_sits_on_float_layers_only(assets):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["chatml_llama"]).eval()
    quantize_model(model, "nf4")
    dorafit.apply(model, dorafit.AdapterConfig(method="lora", r=2, targets=["embed_tokens"]))
    dorafit.merge_and_unload(model)
    assert not any(ops_for(m) is not None and ops_for(m).quantized for m in model.modules())
    assert not getattr(model, "is_loaded_in_4bit", False)


def test_int8_merge_gives_back_the_dtype_the_model_was_quantized_from(assets):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["chatml_llama"], dtype=torch.bfloat16).eval()
    quantize_model(model, "int8")
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=2, targets=["q_proj"]))
    dorafit.merge_and_unload(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model(input_ids=torch.tensor([[5, 6, 7]]))  # one dtype throughout: runs


def test_dequantize_reads_a_weight_the_library_repacked_for_the_cpu():
    """bitsandbytes repacks a Linear4bit weight in place on AVX512-BF16 CPUs at its first eval forward (its block
    scales become bfloat16); done here by hand with the library's own function, dequantize reads what the library's
    own inverse gives back, not the repacked bytes as if they were codes."""
    from bitsandbytes.functional import (
        _convert_weight_packed_for_cpu,
        _convert_weight_packed_for_cpu_inverse,
        dequantize_4bit,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.Linear(128, 64))
    quantize_model(model, "nf4")
    layer = model[0]
    expected = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    library = dequantize_4bit(*_convert_weight_packed_for_cpu_inverse(layer.weight.data.clone(),
                                                                      copy.deepcopy(layer.weight.quant_state)))
    dorafit.dequantize(model)
    torch.testing.assert_close(model[0].weight, library, rtol=0, atol=0)
    torch.testing.assert_close(model[0].weight, expected, rtol=1e-2, atol=1e-3)  # up to the bfloat16 scales


def test_a_model_without_linear_layers_to_quantize_is_refused():
    """A convolutional network (EfficientNet-Lite0: convolutions and a head) has nothing to quantize: one line."""
    from dorafit.train.options import TrainConfig
    from dorafit.train.setup import quantize_base

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match="Sequential has no nn.Linear layer to quantize"):
        quantize_base(model, TrainConfig(method="dora", quantize="nf4"))
