"""Fine-tuning on real models and data: the machinery behind ``dorafit train / eval / merge``.

    options.py      TrainConfig: every option, its default, help and domain; config files; the generated parser
    models.py       model presets (minilm, gemma-3-270m) and local folders, loaded offline
    tasks/          the Task interface and its registry: classification, multiple-choice (commonsense),
                    instruction (Alpaca / messages / ShareGPT files, bbc-headlines), one file each
    setup.py        options -> data, task and adapted model; a run folder -> its trained model
    runner.py       one run: plan, lock, evaluate, train, checkpoint, finish
    loop.py         the training loop (AdamW, accumulation, schedules, deterministic data order and dropout)
    evaluate.py     a task's evaluation in eval mode
    report.py       what is printed: description, progress lines
    metrics_log.py  metrics.jsonl and TensorBoard
    checkpoint.py   resumable checkpoints (one safetensors file, atomic)
    snapshots.py    adapter / weight snapshots for the weight-decomposition analysis
    rundir.py       the run folder's files (config, metrics, eval, samples, loss plot) and its lock
    merge.py        a run's merged model as a plain transformers folder, checked against the adapted one
    distributed.py  torchrun: DDP and FSDP2
    generator.py    a run folder, merged folder or model folder ready to write text (dorafit generate, chat)

Nothing is downloaded: importing this package sets HF_HUB_OFFLINE=1 unless the environment says otherwise.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
