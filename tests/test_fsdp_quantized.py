"""FSDP2 over a quantized base: ``--distributed fsdp --quantize nf4`` holds the frozen base as torchao's NF4
(which FSDP2 shards), in two processes on gloo the same training as one process, resumable after a killed
process, and the adapter it writes loads on a fresh quantized base and on a float (dequantized) one."""

from __future__ import annotations

import subprocess

import pytest
import torch

import dorafit
from dorafit.train.setup import load_trained

from .cli_support import make_chat_llama, make_instruction_files
from .test_distributed import (ENV, TIMEOUT, adapter, kill_rank_1_after, losses, one_process, torchrun,
                               two_processes)

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fsdp-nf4")
    folder = make_chat_llama(root / "llama")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    return {"root": root, "llama": folder, **make_instruction_files(root / "instruct", n=40)}


def options(data, steps: int, *extra) -> list[str]:
    return ["--model", str(data["llama"]), "--task", str(data["messages"]), "--method", "dora", "--steps", str(steps),
            "--batch-size", "4", "--lr", "1e-2", "--seed", "1", "--eval-limit", "2", "--max-new-tokens", "2",
            "--no-eval-before", "--threads", "1", "--quantize", "nf4", "--dtype", "bfloat16", "--distributed", "fsdp",
            *extra]


def assert_close_adapters(a, b) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-3, atol=1e-5, msg=key)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_two_processes_shard_the_nf4_base_and_train_as_one(data):
    single = one_process(data["root"] / "single", *options(data, 3))
    run = data["root"] / "fsdp"
    done = two_processes(run, *options(data, 3))
    assert "FSDPLlamaForCausalLM, bfloat16" in done.stdout and "quantized nf4 (torchao)" in done.stdout
    assert losses(run) == pytest.approx(losses(single), rel=1e-4)
    assert_close_adapters(single, run)

    # the adapter on a fresh quantized base (torchao NF4, as trained) gives the outputs of the one-process run's
    ids = torch.tensor([[5, 17, 300, 4000, 12, 9]])
    quantized, reference = load_trained(run), load_trained(single)
    q = quantized.model.model.layers[0].self_attn.q_proj
    assert type(q.weight).__name__ == "NF4Tensor" and q.lora_A.dtype == torch.float32
    expected = logits(quantized.model, ids)
    torch.testing.assert_close(expected, logits(reference.model, ids), rtol=0.02, atol=0.02)

    # ... and on a float base: the same base dequantized (to bfloat16, the run's dtype), the adapter loaded onto it
    base = load_trained(run)
    dorafit.unload(base.model)
    dorafit.dequantize(base.model)
    weight = base.model.model.layers[0].self_attn.q_proj.weight
    assert type(weight) is torch.nn.Parameter and weight.dtype == torch.bfloat16
    dorafit.load_adapter(base.model, run / "adapter")
    torch.testing.assert_close(logits(base.model, ids), expected, rtol=0.02, atol=0.02)  # bfloat16 compute there


STEPS = 12


def test_killed_process_and_resume_continue_the_nf4_run(data):
    run, whole = data["root"] / "killed", data["root"] / "whole"
    args = options(data, STEPS, "--checkpoint-every", "1")
    killed_at, _ = kill_rank_1_after(args, run, 2, STEPS)
    assert not (run / "adapter").exists()

    done = subprocess.run(torchrun("--resume", run), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from the checkpoint at step {killed_at} of {STEPS}" in done.stdout
    one_process(whole, *args)
    assert losses(run) == pytest.approx(losses(whole), rel=1e-4)
    assert_close_adapters(whole, run)
