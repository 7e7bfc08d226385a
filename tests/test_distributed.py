"""torchrun with 2 processes on the CPU (gloo): the same training as one process, FSDP2 sharding, a killed job.

The runs use a tiny BERT without dropout inside the model, so that 2 processes (each its own micro-batch) and
1 process with ``--grad-accum 2`` (both micro-batches in turn) compute the same steps (see
dorafit.train.distributed). Every subprocess has a timeout, so a hanging job fails the test instead of blocking.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import dorafit
from dorafit.config import AdapterConfig
from dorafit.train import checkpoint, distributed
from dorafit.train.setup import load_trained

from .cli_support import make_chat_llama, make_instruction_files, make_jsonl, read_jsonl, run_cli, tokenizer

TIMEOUT = 240  # seconds for one torchrun job on a loaded 2-core machine
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def make_bert_without_dropout(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return {"root": root, "bert": make_bert_without_dropout(root / "bert"), "jsonl": make_jsonl(root / "pairs.jsonl"),
            "llama": make_chat_llama(root / "llama"), **make_instruction_files(root / "instruct", n=40)}


def options(data, method: str, steps: int, *extra) -> list[str]:
    return ["--model", str(data["bert"]), "--task", str(data["jsonl"]), "--method", method, "--steps", str(steps),
            "--batch-size", "4", "--lr", "3e-3", "--seed", "1", "--eval-limit", "8", "--no-eval-before",
            "--threads", "1", *extra]


def torchrun(*args: str) -> list[str]:
    """2 processes on this machine; --standalone picks a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "dorafit", "train", *map(str, args)]


def one_process(out: Path, *args: str) -> Path:
    """The same global batch in one process: both micro-batches of a step in turn (--grad-accum 2)."""
    code, _, err = run_cli("train", *args, "--grad-accum", "2", "--out", str(out))
    assert code == 0, err
    return out


def two_processes(out: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun(*args, "--out", out), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-5, atol=1e-6, msg=key)


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(data) -> dict:
    """Lazily built runs shared by the tests: 1 process vs 2 processes, per (method, strategy)."""
    cache: dict = {}

    def get(method: str, strategy: str | None = None):
        key = (method, strategy)
        if key not in cache:
            out = data["root"] / f"{method}-{strategy or 'single'}"
            args = options(data, method, 6)
            cache[key] = one_process(out, *args) if strategy is None else \
                (out, two_processes(out, *args, "--distributed", strategy))
        return cache[key]

    return get


@pytest.mark.parametrize("method, strategy", [("lora", "ddp"), ("dora", "fsdp")])
def test_two_processes_train_the_adapter_one_process_trains(runs, method, strategy):
    single = runs(method)
    run, done = runs(method, strategy)
    assert_same_adapter(single, run)
    assert losses(run) == pytest.approx(losses(single), rel=1e-6)
    # rank 0 alone prints and writes: one description, one row per step
    assert done.stdout.count("method  ") == 1 and "4x1x2 examples" in done.stdout
    assert f"{strategy} over gloo" in done.stdout
    assert len(losses(run)) == 6
    stored = json.loads((run / "config.json").read_text())
    assert stored["resolved"]["world_size"] == 2 and stored["config"]["distributed"] == strategy


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_instruction_tuning_in_two_processes_equals_one_process(data, strategy):
    """A causal LM on multi-turn chat data: the same steps as one process with --grad-accum 2, and the
    evaluation (held-out loss, greedy generation) of the sharded or replicated model is the plain one's."""
    args = ["--model", str(data["llama"]), "--task", str(data["messages"]), "--method", "dora", "--steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--seed", "1", "--eval-limit", "3", "--max-new-tokens", "4",
            "--no-eval-before", "--threads", "1"]
    single = data["root"] / "instruct-single"
    if not single.exists():
        one_process(single, *args)
    run = data["root"] / f"instruct-{strategy}"
    two_processes(run, *args, "--distributed", strategy)
    assert_same_adapter(single, run)
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
    a, b = (json.loads((r / "eval.json").read_text())["tasks"]["messages"] for r in (single, run))
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert [r["generated"] for r in read_jsonl(run / "samples.jsonl")] == \
        [r["generated"] for r in read_jsonl(single / "samples.jsonl")]


def test_fsdp_adapter_loads_into_a_plain_model_and_predicts_the_same(runs, data):
    single = runs("dora")
    run, _ = runs("dora", "fsdp")
    plain, reference = load_trained(run, device="cpu"), load_trained(single, device="cpu")
    assert not isinstance(plain.model, FSDPModule)
    texts = [text for text, _ in plain.data.test["pairs"]]
    logits = plain.task.predict(plain.model, texts, plain.device)  # (N, classes)
    torch.testing.assert_close(logits, reference.task.predict(reference.model, texts, reference.device),
                               rtol=1e-5, atol=1e-6)
    # the accuracy the sharded model measured at the end of training is the plain model's
    from dorafit.train.evaluate import evaluate

    stored = json.loads((run / "eval.json").read_text())
    assert evaluate(plain.task, plain.model, plain.device, limit=8, progress=False)[0]["tasks"] == stored["tasks"]


def test_qdora_in_two_processes_equals_one_process(data):
    """--quantize nf4 with DDP: each process quantizes its copy of the base the same way; the adapter trained
    over two processes is the one trained in one."""
    pytest.importorskip("bitsandbytes")
    args = ["--model", str(data["llama"]), "--task", str(data["messages"]), "--method", "dora", "--steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--seed", "1", "--eval-limit", "2", "--max-new-tokens", "2",
            "--no-eval-before", "--threads", "1", "--quantize", "nf4"]
    single = one_process(data["root"] / "qdora-single", *args)
    run = data["root"] / "qdora-ddp"
    done = two_processes(run, *args, "--distributed", "ddp")
    assert "linear layers quantized nf4" in done.stdout
    assert_same_adapter(single, run)
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)


def test_int8_with_fsdp_is_refused_before_anything_starts(data, tmp_path, monkeypatch):
    """FSDP2 shards torchao's NF4 (tests/test_fsdp_quantized.py), not bitsandbytes' packed int8 or fp4."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before the process group is joined
    code, _, err = run_cli("train", "--model", data["llama"], "--task", data["messages"], "--quantize", "int8",
                           "--distributed", "fsdp", "--out", tmp_path / "run")
    assert code == 2 and "error: --quantize int8 does not combine with --distributed fsdp" in err
    assert not (tmp_path / "run").exists()


# ---- DoRA's norm under FSDP2: from full rows, not from a shard --------------------------------------------------
class TwoLayers(nn.Module):
    """A Linear (weight [out, in], rows sharded) and a GPT-2 Conv1D (weight [in, out]: FSDP2 shards its inputs)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.layers = nn.ModuleList([nn.Linear(8, 6), Conv1D(5, 6)])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def record_norms(layer, seen: list):
    """Replace ``layer.weight_norm`` by a wrapper that records (weight type, shape held, norm) of every call."""
    original = type(layer).weight_norm

    @functools.wraps(original)
    def weight_norm(*args, **kwargs):
        n = original(layer, *args, **kwargs)
        w = layer.weight
        held = w.to_local().shape if isinstance(w, DTensor) else w.shape
        seen.append((type(w), tuple(held), n.detach().clone()))
        return n

    layer.weight_norm = weight_norm


def check_norm_under_fsdp() -> None:
    """The norms an adapted layer uses under FSDP2 are those of the full rows; outputs and gradients match."""
    torch.manual_seed(0)
    model = TwoLayers()
    dorafit.apply(model, AdapterConfig(method="dora", r=2, alpha=4, targets=["layers.0", "layers.1"]))
    with torch.no_grad():  # a non-zero update and magnitude != norm: every term of the norm matters
        for _, layer in dorafit.adapted_modules(model):
            layer.lora_B.normal_()
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    want = reference(x)
    want.square().sum().backward()
    want_norms = [layer.weight_norm().detach() for _, layer in dorafit.adapted_modules(reference)]
    seen: dict[str, list] = {}
    for name, layer in dorafit.adapted_modules(model):
        record_norms(layer, seen.setdefault(name, []))
    distributed.shard(model, torch.device("cpu"), 2)
    for name, layer in dorafit.adapted_modules(model):  # sharded: this process holds half of each weight
        local = layer.weight.to_local().shape
        assert local[0] * 2 == layer.weight.shape[0], (name, local)
    model.train()
    got = model(x)
    got.square().sum().backward()
    references = dorafit.adapted_modules(reference)
    for (name, calls), want_n, (_, ref_layer) in zip(seen.items(), want_norms, references):
        assert calls, f"{name}: weight_norm was not called"
        for kind, shape, n in calls:
            assert kind is not DTensor and shape == tuple(ref_layer.weight.shape), f"{name} saw a shard {shape}"
            torch.testing.assert_close(n, want_n, msg=f"{name}: the norm differs from the full rows' norm")
    torch.testing.assert_close(got, want)
    grads = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.full_tensor(), grads[pname].grad, msg=pname)


def check_errors_reach_every_process(rank: int) -> None:
    """A failure on rank 0's own work, or on any process's, stops every process; rank 0 alone explains it."""
    group = distributed.Group(rank, 2, rank, "ddp", "gloo")

    def fails_on(bad_rank: int):
        def work():
            if rank == bad_rank:
                raise ValueError(f"bad input on rank {rank}")
            return "fine"
        return work

    with pytest.raises(ValueError, match="bad input on rank 0") as caught:  # rank 0's own work (the run folder)
        group.on_main(fails_on(0))
    assert isinstance(caught.value, distributed.PeerFailed) == (rank == 1)
    with pytest.raises(ValueError, match="bad input on rank 1") as caught:  # work every process does
        group.on_all(fails_on(1))
    assert isinstance(caught.value, distributed.PeerFailed) == (rank == 1)
    assert rank == 1 or str(caught.value) == "rank 1: bad input on rank 1"  # rank 0 says where it failed
    assert group.on_main(fails_on(5)) == group.on_all(fails_on(5)) == "fine"


def two_process_checks(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_norm_under_fsdp()
        check_errors_reach_every_process(rank)
        dist.barrier()  # both done before either tears gloo down (one exiting early aborted the other, under load)
    finally:
        dist.destroy_process_group()


def test_dora_norm_under_fsdp_is_taken_over_full_rows_and_errors_reach_every_process(tmp_path):
    """In 2 spawned processes: the norm check above, and how a failure in one process reaches the others."""
    import torch.multiprocessing as mp

    context = mp.start_processes(two_process_checks, args=(str(tmp_path / "store"),), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the FSDP2 workers hung")


# ---- a process killed mid-run --------------------------------------------------------------------------------
def checkpoint_step(run: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(run / checkpoint.FILE), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:  # not written yet
        return -1


def worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the launcher's children."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def kill_rank_1_after(args: list, run: Path, step: int, steps: int) -> tuple[int, str]:
    """Start ``torchrun ... train ARGS --out RUN``, SIGKILL rank 1's worker once a checkpoint of at least ``step``
    exists, and wait for the job to stop; (the step of the checkpoint left, the job's stderr). Fails the test if
    the run finished (``steps``) before it could be killed."""
    job = subprocess.Popen(torchrun(*args, "--out", run), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while checkpoint_step(run) < step and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        victim = worker_of_rank(job.pid, 1)
        assert victim is not None and checkpoint_step(run) >= step, f"the job did not reach step {step} in time"
        os.kill(victim, signal.SIGKILL)
        _, err = job.communicate(timeout=120)  # the whole job stops; no hang
    finally:
        if job.poll() is None:
            job.kill()
    killed_at = checkpoint_step(run)
    if killed_at >= steps:
        pytest.fail("the run finished before it could be killed; raise STEPS")
    assert job.returncode != 0
    return killed_at, err


STEPS = 16


def test_killed_process_stops_the_job_and_resume_continues(data):
    run, whole = data["root"] / "killed", data["root"] / "whole"
    args = options(data, "dora", STEPS, "--checkpoint-every", "1")
    killed_at, err = kill_rank_1_after(args, run, 3, STEPS)
    resume_hint = f"torchrun --standalone --nproc-per-node 2 -m dorafit train --resume {run}"
    assert "error: rank 0:" in err and resume_hint in err, err[-3000:]
    assert not (run / "adapter").exists()

    # resume it (with FSDP2 this time: the checkpoint holds full tensors, whatever wrote it)
    done = subprocess.run(torchrun("--resume", run, "--distributed", "fsdp"), env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from the checkpoint at step {killed_at} of {STEPS}" in done.stdout
    one_process(whole, *args)
    assert_same_adapter(whole, run)
    assert losses(run) == pytest.approx(losses(whole), rel=1e-6)

    # a run may only be resumed by as many processes as trained it
    code, _, err = run_cli("train", "--resume", run)
    assert code == 2 and f"{run} was trained by 2 process(es) and is resumed by 1" in err
