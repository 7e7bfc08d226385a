"""Speed and memory of dorafit's LoRA and DoRA, side by side with the frozen base model and the PEFT library.

    models.py   the workloads (a random-weight LLaMA-shaped causal LM, all-MiniLM-L6-v2) and the variants
    measure.py  the primitives: interleaved median timing, saved-for-backward bytes, peak memory
    peak.py     peak RSS of one variant in a fresh process (CPU)
    suite.py    runs every measurement of one workload
    report.py   the table of figures and ratios, and the JSON record

Run it with ``dorafit bench`` (see ``dorafit bench --help`` and benchmarks/README.md).
"""
