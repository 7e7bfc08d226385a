"""Serving K DoRA adapters from one base model: resident memory and batched throughput (``dorafit serve``'s engine).

Memory (each in a fresh process, resident set size after the model is ready and has answered one request, with
its adapter active, and glibc has returned freed memory to the system (``malloc_trim``), so that what building
the adapters allocated and freed is not counted; the tensors' own bytes are given beside it):

    unmerged   the base model + K DoRA adapters kept unmerged (what ``dorafit serve`` holds)
    merged1    one merged model (what serving a single adapter merged costs)
    mergedK    K merged copies (the usual workaround for serving K DoRA adapters)

Throughput: N concurrent requests, mixed over the K adapters, each generating T tokens greedily after its own
prompt, through :class:`dorafit.serving.engine.Engine` run in the main thread as ``dorafit serve`` runs it:
batched (``max_batch_size`` N: one forward per token for every request) against one request at a time
(``max_batch_size`` 1), interleaved, generated tokens per second (the prompts' prefill included), from wall time
and from the process's CPU time (with one torch thread, the work done: other jobs on a shared machine stretch it
less). Each for the default engine and for ``--pack-weights`` (``Engine(pack_weights=True)``: oneDNN products
with packed weights, :mod:`dorafit.serving.packed`); ``--variants`` picks.

Bound (``bound``): the batched / one-at-a-time ratio the model's forwards alone allow, from the CPU time of one
prompt's prefill, of the N prompts' prefill in one forward (as the batched engine prefills them: prompts of about
one length together, up to 512 tokens while none is decoding) and of a 1-row and an N-row decode forward
(see :func:`measure_bound`): what no engine overhead cut can exceed with these kernels.

The model is the LLaMA-shaped random model of ``dorafit bench`` (hidden 1024, intermediate 2816, 4 layers, 16 heads,
vocabulary 32,000) with DoRA r 16 on q, k, v, up, down, each adapter's B and magnitude perturbed from their init
by its own seed (so the adapters differ and are not the identity). Results go to
``benchmarks/results/serving-<date>.json`` and a Markdown table on stdout.

Time to first token (``ttft``): a 16-token request's time from submission to its first token, alone, and submitted
while a 3,000-token prompt is being prefilled (after its first chunk), with chunked prefill (``--prefill-chunk``)
and without (the whole prompt in one forward, as before chunking); and the long prompt's own time to its first
token, alone, in those chunks (what smaller chunks cost it).

DoRA decode (``dora_decode``): one request generating T tokens with an unmerged DoRA adapter / with that adapter
merged into the weights (seconds per token, interleaved repeats).

    .venv/bin/python benchmarks/serving.py [--adapters 4] [--tokens 32] [--concurrency 1,4,8] [--threads 2]
        [--parts memory,throughput,bound,ttft,dora_decode] [--variants default,packed] [--prefill-chunk 64]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import dorafit  # noqa: E402
from dorafit.bench.generation import perturb  # noqa: E402
from dorafit.bench.measure import rss_bytes  # noqa: E402
from dorafit.bench.models import LLAMA_TARGETS, WorkloadSpec, build_workload  # noqa: E402
from dorafit.bench.report import load_average, machine  # noqa: E402
from dorafit.files import atomic_write_json  # noqa: E402
from dorafit.generation import SamplingOptions  # noqa: E402
from dorafit.serving.engine import Engine, Request, default_prefill_chunk  # noqa: E402

MIB = 2**20


def base_model(seq: int = 64):
    spec = WorkloadSpec(model="llama", batch=1, seq=seq, r=16, alpha=32)  # positions up to max(seq, 2048)
    model = build_workload(spec).base
    model.config.use_cache = True
    return model.eval()


def adapted(model, k: int):
    """The base with K named DoRA adapters beside each other ("a0" the model's own), each perturbed by its seed."""
    for i in range(k):
        torch.manual_seed(i)
        dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=16, alpha=32, targets=LLAMA_TARGETS), name=f"a{i}")
        dorafit.set_adapter(model, f"a{i}")
        perturb(model, seed=100 + i)
    dorafit.set_adapter(model, None)
    model.requires_grad_(False)
    return model


def merged_copy(seed_index: int):
    model = base_model()
    torch.manual_seed(seed_index)
    dorafit.apply(model, dorafit.AdapterConfig(method="dora", r=16, alpha=32, targets=LLAMA_TARGETS))
    perturb(model, seed=100 + seed_index)
    return dorafit.merge_and_unload(model).requires_grad_(False)


class Tokens:
    """The engine needs a tokenizer only to decode for stop strings (none here) and for its pad/EOS ids."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def memory_child(what: str, k: int) -> None:
    """In a fresh process: build ``what``, answer one request, print the resident set size (MiB) as JSON."""
    torch.set_num_threads(1)
    start = rss_bytes()
    if what == "unmerged":
        models = [adapted(base_model(), k)]
        dorafit.set_adapter(models[0], "a0")
    elif what == "merged1":
        models = [merged_copy(0)]
    else:
        models = [merged_copy(i) for i in range(k)]
    for model in models:
        with torch.no_grad():
            model.generate(input_ids=torch.ones(1, 8, dtype=torch.long), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for m in models for t in [*m.parameters(), *m.buffers()]}
    print(json.dumps({"rss_mib": rss_bytes() / MIB, "rss_at_start_mib": start / MIB,
                      "tensor_mib": sum(tensors.values()) / MIB}))


def measure_packed_memory(k: int) -> dict:
    """What ``--pack-weights`` adds: resident memory of the base + K unmerged adapters before and after packing
    (after ``malloc_trim``), and the bytes of the float32 linear weights it packs."""
    from dorafit.serving.packed import PackedLinears

    model = adapted(base_model(), k)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = rss_bytes()
    packed = PackedLinears(model, 8)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out = {"rss_before_mib": before / MIB, "rss_after_mib": rss_bytes() / MIB,
           "linear_weights_mib": sum(w.numel() * w.element_size() for w, _, _ in packed.packed.values()) / MIB}
    print(f"  --pack-weights: +{out['rss_after_mib'] - out['rss_before_mib']:.0f} MiB resident (float32 linear "
          f"weights: {out['linear_weights_mib']:.0f} MiB)", file=sys.stderr, flush=True)
    return out


def measure_memory(k: int) -> dict:
    out = {}
    for what in ("unmerged", "merged1", "mergedK"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", what, "--adapters", str(k)],
                              capture_output=True, text=True, check=True)
        out[what] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run_requests(engine: Engine, prompts: list[list[int]], adapters: list[str], tokens: int) -> float:
    """Submit every request at once and run the engine in this (the main) thread, as ``dorafit serve`` does,
    until all have finished: the seconds it took (wall clock; :func:`run_requests_timed` gives CPU time too)."""
    return run_requests_timed(engine, prompts, adapters, tokens)[0]


def run_requests_timed(engine: Engine, prompts: list[list[int]], adapters: list[str],
                       tokens: int) -> tuple[float, float]:
    """:func:`run_requests`: ``(wall seconds, this process's CPU seconds)``. With one torch thread the CPU time is
    the work done, which other jobs on a shared machine stretch less than the wall time (they still compete for
    caches and memory bandwidth)."""
    cpu = time.process_time()
    return _run(engine, prompts, adapters, tokens), time.process_time() - cpu


def _run(engine: Engine, prompts: list[list[int]], adapters: list[str], tokens: int) -> float:
    done = threading.Event()
    left = [len(prompts)]

    def on_token(token, reason):
        if reason is not None:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    options = SamplingOptions(max_new_tokens=tokens)
    started = time.perf_counter()
    for prompt, adapter in zip(prompts, adapters):
        engine.submit(Request(prompt, adapter, options, on_token=on_token))
    engine.run(until=done.is_set)
    return time.perf_counter() - started


def measure_throughput(model, k: int, tokens: int, concurrency: list[int], repeats: int,
                       variants: list[str]) -> dict:
    """Per concurrency n and variant ("default", or "packed": ``Engine(pack_weights=True)``): batched
    (``max_batch_size`` n) and one at a time, interleaved; generated tokens per second (wall and CPU time)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    out = {}
    for n in concurrency:
        prompts = [torch.randint(1, vocab, (48,), generator=g).tolist() for _ in range(n)]
        adapters = [f"a{i % k}" for i in range(n)]
        engines = {}
        for variant in variants:
            for mode, size in (("batched", n), ("one_at_a_time", 1)):
                engine = Engine(model, Tokens(), max_batch_size=size, pack_weights=variant == "packed")
                engine.stops = set()  # exactly `tokens` tokens per request
                run_requests(engine, prompts[:1], adapters[:1], 2)  # warm-up
                engines[variant, mode] = engine
        times = {key: [] for key in engines}
        for _ in range(repeats):
            for key, engine in engines.items():
                times[key].append(run_requests_timed(engine, prompts, adapters, tokens))
        out[n] = {}
        for variant in variants:
            r = out[n][variant] = {}
            for mode in ("batched", "one_at_a_time"):
                wall, cpu = ([t[i] for t in times[variant, mode]] for i in (0, 1))
                r[mode] = {"seconds": statistics.median(wall), "seconds_all": wall,
                           "cpu_seconds": statistics.median(cpu), "cpu_seconds_all": cpu,
                           "tokens_per_s": n * tokens / statistics.median(wall),
                           "tokens_per_cpu_s": n * tokens / statistics.median(cpu)}
            r["speedup"] = r["batched"]["tokens_per_s"] / r["one_at_a_time"]["tokens_per_s"]
            r["speedup_cpu"] = r["batched"]["tokens_per_cpu_s"] / r["one_at_a_time"]["tokens_per_cpu_s"]
            # the batch against the default engine one at a time too (packing might slow one row)
            default = out[n].get("default", r)["one_at_a_time"]
            r["speedup_vs_default_one_at_a_time"] = r["batched"]["tokens_per_s"] / default["tokens_per_s"]
            print(f"  {n} concurrent, {variant}: batched {r['batched']['tokens_per_s']:.1f} tokens/s, one at a time "
                  f"{r['one_at_a_time']['tokens_per_s']:.1f}: {r['speedup']:.2f}x (CPU time: {r['speedup_cpu']:.2f}x)",
                  file=sys.stderr, flush=True)
    return out


def cpu_ms(fn, repeats: int) -> float:
    """Median CPU milliseconds of ``fn()`` (after one warm-up call)."""
    fn()
    runs = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        runs.append(time.process_time() - started)
    return 1000 * statistics.median(runs)


def measure_bound(model, k: int, n: int, tokens: int, repeats: int, variants: list[str]) -> dict:
    """The batched / one-at-a-time ratio the model's forwards alone allow (no engine, no KV cache bookkeeping):
    with P the CPU time of one 48-token prompt's prefill, Pn that of the n prompts in one forward (the batched
    engine prefills waiting prompts of about one length together, up to 512 tokens while none is decoding), D1 of
    a one-row decode forward and Dn of an n-row one (rows with mixed adapters), n requests of ``tokens`` tokens take
    n P + n tokens D1 one at a time and Pn + tokens Dn batched (n P + tokens Dn before batched prefill).
    "packed": Dn with packed weights (P, Pn and D1 as the default: the engine packs only decode forwards of two
    rows or more)."""
    import contextlib

    from dorafit.multi import per_row_adapters
    from dorafit.serving.packed import PackedLinears

    ids = torch.randint(1, model.config.vocab_size, (n, 48), generator=torch.Generator().manual_seed(3))
    names = [f"a{i % k}" for i in range(n)]

    def forward(rows: int, length: int, mode) -> None:
        with torch.no_grad(), per_row_adapters(model, names[:rows]), mode or contextlib.nullcontext():
            model(input_ids=ids[:rows, :length], use_cache=False, logits_to_keep=1)

    out = {}
    for variant in variants:
        mode = PackedLinears(model, n) if variant == "packed" else None
        r = {"prefill_ms": cpu_ms(lambda: forward(1, 48, None), repeats),  # the engine packs only batched decoding
             f"prefill_{n}_batched_ms": cpu_ms(lambda: forward(n, 48, None), repeats),
             "decode_1_row_ms": cpu_ms(lambda: forward(1, 1, None), 4 * repeats),
             f"decode_{n}_rows_ms": cpu_ms(lambda: forward(n, 1, mode), 4 * repeats)}
        p, pn, d1, dn = r["prefill_ms"], r[f"prefill_{n}_batched_ms"], r["decode_1_row_ms"], r[f"decode_{n}_rows_ms"]
        r["decode_rows_cost_ratio"] = dn / d1
        r["bound"] = (n * p + n * tokens * d1) / (pn + tokens * dn)
        r["bound_prefill_one_at_a_time"] = (n * p + n * tokens * d1) / (n * p + tokens * dn)
        r["bound_without_prefill"] = n * d1 / dn
        out[variant] = r
        print(f"  forwards, {variant}: prefill {p:.1f} ms, {n} prompts in one forward {pn:.1f} ms, decode 1 "
              f"row {d1:.1f} ms, {n} rows {dn:.1f} ms ({dn / d1:.2f}x): batched / one at a time at most "
              f"{r['bound']:.2f}x ({r['bound_prefill_one_at_a_time']:.2f}x prefilling one prompt at a time, "
              f"{r['bound_without_prefill']:.2f}x without prefill)", file=sys.stderr, flush=True)
    return out


def time_to_first_token(model, long_tokens: int, chunk: int, with_long: bool) -> float:
    """Seconds from submitting a 16-token request to its first token (alone, or while a ``long_tokens`` prompt is
    prefilled: submitted once the long prompt's first chunk is in)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(11)
    engine = Engine(model, Tokens(), max_batch_size=8, prefill_chunk=chunk)
    engine.stops = set()
    times = {}

    def on_short(token, reason):
        times.setdefault("first", time.perf_counter())

    short = Request(torch.randint(1, vocab, (16,), generator=g).tolist(), "a0", SamplingOptions(max_new_tokens=2),
                    on_token=on_short)
    if with_long:
        long = Request(torch.randint(1, vocab, (long_tokens,), generator=g).tolist(), "a1",
                       SamplingOptions(max_new_tokens=2))
        engine.submit(long)

        def submit_short():  # once the long prefill is under way: its first chunk in, or (one forward for the
            while not engine.prefilling or (chunk < long_tokens and engine.prefilling[0].done == 0):  # whole
                time.sleep(0.001)                                                       # prompt) 0.1 s into it
            if chunk >= long_tokens:
                time.sleep(0.1)
            times["submitted"] = time.perf_counter()
            engine.submit(short)

        threading.Thread(target=submit_short, daemon=True).start()
    else:
        times["submitted"] = time.perf_counter()
        engine.submit(short)
    engine.run(until=lambda: "first" in times)
    engine.stop()
    return times["first"] - times["submitted"]


def long_prefill_seconds(model, long_tokens: int, chunk: int) -> float:
    """Seconds from submitting a ``long_tokens`` prompt alone to its first token, prefilled in chunks of ``chunk``:
    what smaller chunks cost the long prompt itself."""
    prompt = torch.randint(1, model.config.vocab_size, (long_tokens,), generator=torch.Generator().manual_seed(12))
    engine = Engine(model, Tokens(), max_batch_size=8, prefill_chunk=chunk)
    engine.stops = set()
    times = {}
    request = Request(prompt.tolist(), "a1", SamplingOptions(max_new_tokens=1),
                      on_token=lambda token, reason: times.setdefault("first", time.perf_counter()))
    started = time.perf_counter()
    engine.submit(request)
    engine.run(until=lambda: "first" in times)
    engine.stop()
    return times["first"] - started


def measure_ttft(model, long_tokens: int, chunk: int, repeats: int) -> dict:
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, long_tokens + 64)
    time_to_first_token(model, 64, chunk, with_long=False)  # warm-up
    runs = {"alone": [], f"beside_{long_tokens}_chunked": [], f"beside_{long_tokens}_unchunked": [],
            f"long_{long_tokens}_prefill": []}
    for _ in range(repeats):
        runs["alone"].append(time_to_first_token(model, long_tokens, chunk, with_long=False))
        runs[f"beside_{long_tokens}_chunked"].append(time_to_first_token(model, long_tokens, chunk, with_long=True))
        runs[f"beside_{long_tokens}_unchunked"].append(
            time_to_first_token(model, long_tokens, long_tokens, with_long=True))
        runs[f"long_{long_tokens}_prefill"].append(long_prefill_seconds(model, long_tokens, chunk))
    out = {name: {"seconds": statistics.median(t), "seconds_all": t} for name, t in runs.items()}
    out["chunk"] = chunk
    out["chunked_vs_alone"] = out[f"beside_{long_tokens}_chunked"]["seconds"] / out["alone"]["seconds"]
    out["unchunked_vs_alone"] = out[f"beside_{long_tokens}_unchunked"]["seconds"] / out["alone"]["seconds"]
    print(f"  TTFT alone {out['alone']['seconds']:.3f} s; beside a {long_tokens}-token prefill: chunked "
          f"{out['chunked_vs_alone']:.2f}x, unchunked {out['unchunked_vs_alone']:.2f}x; the long prompt's own prefill "
          f"{out[f'long_{long_tokens}_prefill']['seconds']:.2f} s", file=sys.stderr, flush=True)
    return out


def measure_dora_decode(tokens: int, repeats: int) -> dict:
    """Seconds per generated token at batch 1: unmerged DoRA adapter a0 / the same adapter merged."""
    unmerged, merged = adapted(base_model(), 1), merged_copy(0)
    vocab = unmerged.config.vocab_size
    prompt = torch.randint(1, vocab, (48,), generator=torch.Generator().manual_seed(5)).tolist()
    engines = {"unmerged": (Engine(unmerged, Tokens(), max_batch_size=1), "a0"),
               "merged": (Engine(merged, Tokens(), max_batch_size=1), None)}
    times = {name: [] for name in engines}
    for name, (engine, adapter) in engines.items():
        engine.stops = set()
        run_requests(engine, [prompt], [adapter], 2)  # warm-up
    for _ in range(repeats):
        for name, (engine, adapter) in engines.items():
            times[name].append([t / tokens for t in run_requests_timed(engine, [prompt], [adapter], tokens)])
    out = {name: {"seconds_per_token": statistics.median(t[0] for t in runs), "all": [t[0] for t in runs],
                  "cpu_seconds_per_token": statistics.median(t[1] for t in runs), "cpu_all": [t[1] for t in runs]}
           for name, runs in times.items()}
    out["unmerged_vs_merged"] = out["unmerged"]["seconds_per_token"] / out["merged"]["seconds_per_token"]
    out["unmerged_vs_merged_cpu"] = out["unmerged"]["cpu_seconds_per_token"] / out["merged"]["cpu_seconds_per_token"]
    print(f"  DoRA decode at batch 1: unmerged / merged {out['unmerged_vs_merged']:.3f} (CPU time: "
          f"{out['unmerged_vs_merged_cpu']:.3f})", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="memory,throughput,bound,ttft,dora_decode",
                        help="what to measure (default: all of memory,throughput,bound,ttft,dora_decode; also "
                        "packed_memory)")
    parser.add_argument("--variants", default="default,packed",
                        help="throughput and bound: engines to measure: default, packed (--pack-weights)")
    parser.add_argument("--long-prompt", type=int, default=3000, help="ttft: the long prompt's tokens")
    parser.add_argument("--prefill-chunk", type=int, default=default_prefill_chunk(torch.device("cpu")),
                        help="ttft: prompt tokens per prefill step (default: dorafit serve's on a CPU)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.adapters)
        return 0
    torch.set_num_threads(args.threads)
    meta = {**machine(), "load_average_start": load_average(), "command": " ".join(["benchmarks/serving.py",
                                                                                     *sys.argv[1:]])}
    parts = args.parts.split(",")
    variants = args.variants.split(",")
    memory, throughput, bound, ttft, dora_decode = {}, {}, {}, {}, {}
    if "memory" in parts:
        print("memory (fresh processes)", file=sys.stderr, flush=True)
        memory = measure_memory(args.adapters)
    packed_memory = {}
    if "packed_memory" in parts:
        print("memory of --pack-weights", file=sys.stderr, flush=True)
        packed_memory = measure_packed_memory(args.adapters)
    if "throughput" in parts:
        print("throughput", file=sys.stderr, flush=True)
        model = adapted(base_model(), args.adapters)
        throughput = measure_throughput(model, args.adapters, args.tokens,
                                        [int(c) for c in args.concurrency.split(",")], args.repeats, variants)
    if "bound" in parts:
        print("forward costs (CPU time)", file=sys.stderr, flush=True)
        n = max(int(c) for c in args.concurrency.split(","))
        bound = measure_bound(adapted(base_model(), args.adapters), args.adapters, n, args.tokens,
                              args.repeats, variants)
    if "ttft" in parts:
        print("time to first token", file=sys.stderr, flush=True)
        ttft = measure_ttft(adapted(base_model(), 2), args.long_prompt, args.prefill_chunk, args.repeats)
    if "dora_decode" in parts:
        print("DoRA decode, unmerged / merged", file=sys.stderr, flush=True)
        dora_decode = measure_dora_decode(args.tokens, args.repeats)
    meta["load_average_end"] = load_average()
    ratios = {}
    if memory:
        ratios = {"unmerged_vs_merged1_memory": memory["unmerged"]["rss_mib"] / memory["merged1"]["rss_mib"],
                  "unmerged_vs_mergedK_memory": memory["unmerged"]["rss_mib"] / memory["mergedK"]["rss_mib"]}
    if ttft:
        ratios["ttft_chunked_vs_alone"] = ttft["chunked_vs_alone"]
    if dora_decode:
        ratios["dora_decode_unmerged_vs_merged"] = dora_decode["unmerged_vs_merged"]
    record = {"meta": meta, "adapters": args.adapters, "tokens": args.tokens, "memory": memory,
              "packed_memory": packed_memory, "throughput": throughput, "bound": bound, "ttft": ttft,
              "dora_decode": dora_decode, "ratios": ratios}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = ROOT / "benchmarks" / "results" / f"serving-{stamp}.json"
    atomic_write_json(path, record)
    k = args.adapters
    lines = [f"Serving {k} DoRA adapters (r 16 on q, k, v, up, down) of the LLaMA-shaped model; {meta['cpu']}, "
             f"{args.threads} threads, load average {meta['load_average_start']} -> {meta['load_average_end']}, "
             f"{meta['date_utc']} UTC"]
    if memory:
        lines += ["", "| resident memory | MiB | tensors MiB | ratio |", "|---|---:|---:|---:|",
                  f"| base + {k} unmerged adapters | {memory['unmerged']['rss_mib']:.0f} | "
                  f"{memory['unmerged']['tensor_mib']:.0f} | |",
                  f"| one merged model | {memory['merged1']['rss_mib']:.0f} | {memory['merged1']['tensor_mib']:.0f} "
                  f"| unmerged / this: {ratios['unmerged_vs_merged1_memory']:.3f} (target <= 1.15) |",
                  f"| {k} merged copies | {memory['mergedK']['rss_mib']:.0f} | {memory['mergedK']['tensor_mib']:.0f} "
                  f"| unmerged / this: {ratios['unmerged_vs_mergedK_memory']:.3f} |"]
    if packed_memory:
        m = packed_memory
        lines += ["", f"--pack-weights: resident memory {m['rss_before_mib']:.0f} -> {m['rss_after_mib']:.0f} MiB "
                  f"(float32 linear weights: {m['linear_weights_mib']:.0f} MiB)"]
    if throughput:
        lines += ["", f"| concurrent requests ({args.tokens} tokens each, adapters mixed) | engine | batched tokens/s "
                  "| one at a time tokens/s | batched / one at a time | the same in CPU time "
                  "| batched / default engine one at a time |", "|---|---|---:|---:|---:|---:|---:|"]
    for n, by_variant in throughput.items():
        target = " (target >= 3)" if n == max(throughput) else ""
        for variant, r in by_variant.items():
            lines.append(f"| {n} | {variant} | {r['batched']['tokens_per_s']:.1f} | "
                         f"{r['one_at_a_time']['tokens_per_s']:.1f} | {r['speedup']:.2f}{target} | "
                         f"{r['speedup_cpu']:.2f} | {r['speedup_vs_default_one_at_a_time']:.2f} |")
    if bound:
        n = max(int(c) for c in args.concurrency.split(","))
        lines += ["", f"| forwards alone, CPU ms | prefill 48 tokens | {n} prompts batched | decode 1 row | decode {n} "
                  f"rows | {n} rows / 1 | batched / one at a time at most | prefilling one at a time | without prefill "
                  "|", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for variant, r in bound.items():
            lines.append(f"| {variant} | {r['prefill_ms']:.1f} | {r[f'prefill_{n}_batched_ms']:.1f} | "
                         f"{r['decode_1_row_ms']:.1f} | {r[f'decode_{n}_rows_ms']:.1f} | "
                         f"{r['decode_rows_cost_ratio']:.2f} | {r['bound']:.2f} | "
                         f"{r['bound_prefill_one_at_a_time']:.2f} | {r['bound_without_prefill']:.2f} |")
    if ttft:
        long = args.long_prompt
        lines += ["", "| time to first token of a 16-token request | seconds | / alone |", "|---|---:|---:|",
                  f"| alone | {ttft['alone']['seconds']:.3f} | 1 |",
                  f"| beside a {long}-token prompt, prefilled in chunks of {ttft['chunk']} | "
                  f"{ttft[f'beside_{long}_chunked']['seconds']:.3f} | {ttft['chunked_vs_alone']:.2f} (target <= 2) |",
                  f"| beside a {long}-token prompt, prefilled in one forward | "
                  f"{ttft[f'beside_{long}_unchunked']['seconds']:.3f} | {ttft['unchunked_vs_alone']:.2f} |",
                  f"| the {long}-token prompt's own prefill, alone, in chunks of {ttft['chunk']} | "
                  f"{ttft[f'long_{long}_prefill']['seconds']:.3f} | |"]
    if dora_decode:
        d = dora_decode
        lines += ["", "| decode at batch 1 | ms per token | CPU ms per token |", "|---|---:|---:|",
                  f"| unmerged DoRA | {1000 * d['unmerged']['seconds_per_token']:.1f} | "
                  f"{1000 * d['unmerged']['cpu_seconds_per_token']:.1f} |",
                  f"| merged | {1000 * d['merged']['seconds_per_token']:.1f} | "
                  f"{1000 * d['merged']['cpu_seconds_per_token']:.1f} |",
                  f"| unmerged / merged | {d['unmerged_vs_merged']:.3f} (target <= 1.05) | "
                  f"{d['unmerged_vs_merged_cpu']:.3f} |"]
    print("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
