"""``dorafit bench``: its measuring primitives and a run on a tiny LLaMA (no timing thresholds)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dorafit import cli
from dorafit.bench import peak
from dorafit.bench.measure import SavedTensorCounter, interleaved_times, model_storages
from dorafit.bench.models import QUANTIZED_VARIANTS, TRAIN_VARIANTS, WorkloadSpec, llama_sizes

TINY = ["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--vocab", "50", "--batch", "2",
        "--seq", "8", "--r", "4", "--vera-r", "8"]


def test_saved_tensor_counter_counts_distinct_storages_except_parameters():
    layer = nn.Linear(10, 10)
    x = torch.randn(3, 10, requires_grad=True)
    with SavedTensorCounter(exclude=model_storages(layer)) as counter:
        h = layer(x)  # saves x and the weight (a parameter: not counted)
        y = h.exp()  # saves its output
        z = (x * x).sum() + (x.view(30) * 2).sum()  # saves x again, twice, once through a view
        dropped = (x + 1).exp()  # saves its output, then the whole branch is dropped
        del dropped
    assert counter.count == 2
    assert counter.nbytes == x.untyped_storage().nbytes() + y.untyped_storage().nbytes()
    assert z.requires_grad


def test_interleaved_times_discards_warmup_and_rotates_order():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved_times(fns, warmup=1, repeats=2, device="cpu")
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert calls == list("abc") + list("bca") + list("cab")


def test_bench_on_a_tiny_llama_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "result.json"
    args = ["bench", "--models", "llama", *TINY, "--warmup", "0", "--steps", "1", "--inference-steps", "1",
            "--peak-steps", "0", "--out", str(out)]
    assert cli.main(args) == 0
    record = json.loads(out.read_text())
    meta = record["meta"]
    for key in ("torch", "transformers", "peft", "cpu", "torch_threads", "load_average_start", "load_average_end"):
        assert meta[key] is not None
    assert meta["command"].startswith("dorafit bench --models llama --warmup 0 --steps 1")
    result = record["workloads"]["llama"]
    train = result["train"]
    assert set(train) == set(TRAIN_VARIANTS)
    for group in (set(TRAIN_VARIANTS) - set(QUANTIZED_VARIANTS), QUANTIZED_VARIANTS):
        losses = [train[v]["first_loss"] for v in group]
        assert max(losses) - min(losses) < 1e-5 * abs(losses[0]), "every variant starts as the same model"
    assert train["qdora"]["first_loss"] != train["dora"]["first_loss"]  # the quantized base is another model
    assert train["qdora"]["trainable_params"] == train["peft_qdora"]["trainable_params"] == \
        train["dora"]["trainable_params"]
    assert train["base"]["trainable_params"] == 0
    assert train["dora"]["trainable_params"] == train["peft_dora"]["trainable_params"]
    # VeRA: d [r] and b [out] per adapted layer (q, k, v: 32 -> 32, up: 32 -> 64, down: 64 -> 32); DVoRA adds m [out]
    outs = [32, 32, 32, 64, 32]
    assert train["vera"]["trainable_params"] == train["peft_vera"]["trainable_params"] == sum(o + 8 for o in outs)
    assert train["dvora"]["trainable_params"] == train["vera"]["trainable_params"] + sum(outs)
    assert all(train[v]["step_ms"] > 0 and train[v]["saved_mib"] > 0 for v in TRAIN_VARIANTS)
    assert train["dora"]["saved_mib"] < train["peft_dora"]["saved_mib"]
    assert set(result["inference"]) == {"base", "dora_merged", "dora", "lora", "dvora", "vera", "peft_dora"}
    ratios = result["ratios"]
    assert ratios["dora_vs_lora_step"]["target"] == 1.10
    assert "dora_vs_lora_peak" not in ratios  # peak memory was not measured
    assert {"dvora_vs_vera_step", "vera_vs_peft_vera_step", "dvora_vs_vera_saved"} <= set(ratios)
    assert ratios["qdora_vs_peft_qdora_step"]["target"] == 0.85 and ratios["qdora_vs_qlora_step"]["target"] == 1.10
    generation = result["generation"]
    assert set(generation) == {"dora_merged", "dora", "lora", "peft_dora"}
    assert all(g["tokens_per_s"] > 0 and g["new_tokens"] == 32 for g in generation.values())
    assert generation["dora"]["same_tokens_as_merged"] is True  # greedy, unmerged (norm cached) == merged
    assert ratios["dora_vs_merged_generation"]["target"] == pytest.approx(1 / 0.95, rel=1e-3)
    table = capsys.readouterr().out
    assert "| our DoRA step / our LoRA step |" in table and "| generation variant |" in table


def test_bench_variants_option_runs_the_base_and_the_named_variants_only(tmp_path):
    out = tmp_path / "result.json"
    args = ["bench", "--models", "llama", *TINY, "--warmup", "0", "--steps", "1", "--inference-steps", "1",
            "--peak-steps", "0", "--variants", "vera,dvora", "--out", str(out)]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())["workloads"]["llama"]
    assert set(result["train"]) == set(result["inference"]) == {"base", "vera", "dvora"}
    assert set(result["ratios"]) == {"dvora_vs_vera_step", "dvora_vs_vera_saved", "dvora_vs_vera_inference"}
    assert set(result["generation"]) == {"dora_merged"}  # the reference always runs


def test_bench_refuses_an_unknown_variant(capsys):
    with pytest.raises(SystemExit, match="--variants takes a comma-separated list of dora, dora_full_norm, dvora"):
        cli.main(["bench", "--models", "llama", "--variants", "dora,xlora"])


@pytest.mark.parametrize("variant", ["dora", "qdora"])
def test_peak_entry_point_reports_resident_memory(capsys, variant):
    spec = WorkloadSpec(model="llama", batch=2, seq=8, r=4, sizes=llama_sizes(32, 64, 1, 2, 50))
    assert peak.main([json.dumps(spec.to_dict()), variant, "1", "0"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["peak_mib"] > 0 and answer["peak_over_setup_mib"] >= 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "gpt5"], "--models takes a comma-separated list"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_bench_rejects_bad_options_with_a_clear_message(args, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", *args])


def test_live_tensor_bytes_follows_creation_and_frees():
    from dorafit.bench.measure import LiveTensorBytes

    x = torch.randn(1000, requires_grad=True)  # exists before: never counted
    with LiveTensorBytes() as live:
        a = x * 2  # 4000 bytes
        b = a.exp()  # 4000 bytes, saved for backward (exp keeps its output)
        b.view(10, 100).add_(1)  # a view and an in-place op: nothing new
        del a
        assert live.alive_bytes() == 4000
        c = torch.ones(500)  # 2000 bytes
        del c
        assert live.alive_bytes() == 4000
    assert live.peak == 8000
    assert b.requires_grad


def test_bench_memory_section_on_a_tiny_llama(tmp_path, capsys):
    out = tmp_path / "memory.json"
    args = ["bench", "--models", "llama", *TINY, "--warmup", "0", "--steps", "1", "--sections", "memory",
            "--out", str(out)]
    assert cli.main(args) == 0
    result = json.loads(out.read_text())["workloads"]["llama"]
    assert "train" not in result and result["ratios"] == {}
    memory = result["memory"]["variants"]
    assert set(memory) == {"lora", "dora", "dora_recompute", "lora_checkpointed", "dora_checkpointed"}
    # deterministic memory figures (no timing): recompute keeps what LoRA keeps, save one output more per layer
    assert memory["dora_recompute"]["saved_mib"] < memory["dora"]["saved_mib"]
    assert memory["dora_recompute"]["saved_mib"] <= 1.05 * memory["lora"]["saved_mib"]
    assert memory["dora_checkpointed"]["alive_after_forward_mib"] <= 1.02 * memory["lora_checkpointed"][
        "alive_after_forward_mib"]
    assert memory["lora_checkpointed"]["saved_mib"] is None  # hooks cannot see what checkpoints keep
    losses = [v["first_loss"] for v in memory.values()]
    assert max(losses) - min(losses) < 1e-5 * abs(losses[0])
    assert "| DoRA (recompute) saved activations / LoRA |" in capsys.readouterr().out


def test_bench_compile_section_on_a_tiny_llama(tmp_path, capsys):
    out = tmp_path / "compile.json"
    args = ["bench", "--models", "llama", *TINY, "--warmup", "0", "--steps", "1", "--inference-steps", "1",
            "--sections", "compile", "--compile-backend", "aot_eager", "--variants", "lora,dora", "--out", str(out)]
    assert cli.main(args) == 0
    compiled = json.loads(out.read_text())["workloads"]["llama"]["compile"]
    names = {f"{v}_{m}" for v in ("base", "lora", "dora") for m in ("eager", "compiled")}
    assert set(compiled["train"]) == set(compiled["eval"]) == names
    for section in ("train", "eval"):
        for variant in ("lora_compiled", "dora_compiled"):
            row = compiled[section][variant]
            assert (row["graphs"], row["graph_breaks"], row["graphs_compiled_while_timing"]) == (1, 0, 0), row
    assert {"compiled_dora_vs_compiled_lora_step", "compiled_dora_vs_compiled_lora_eval",
            "compiled_vs_eager_dora_step"} <= set(compiled["ratios"])
    assert "| compiled DoRA step / compiled LoRA step |" in capsys.readouterr().out
