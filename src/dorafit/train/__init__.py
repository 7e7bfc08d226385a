"""Fine-tuning on real models and data: the machinery behind ``dorafit train / eval / merge``.

    options.py     TrainConfig: every option, its default and help; config files; the generated CLI parser
    models.py      model presets (minilm, gemma-3-270m) and local folders, loaded offline
    data.py        task presets (tweets, bbc, commonsense) and .jsonl/.csv / commonsense-folder data
    tasks.py       examples -> model inputs and training loss (classification, causal-LM commonsense)
    evaluate.py    test accuracy per task and average
    loop.py        the training loop (AdamW, accumulation, schedules, deterministic data order and dropout)
    checkpoint.py  resumable checkpoints (one safetensors file, atomic)
    snapshots.py   adapter / weight snapshots for the weight-decomposition analysis
    rundir.py      the run folder's files (config, metrics, eval, loss plot)
    run.py         one run from options to run folder, and a run folder back to its trained model

Nothing is downloaded: importing this package sets HF_HUB_OFFLINE=1 unless the environment says otherwise.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
