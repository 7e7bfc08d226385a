"""Fine-tuning on real models and data: the machinery behind ``dorafit train / eval / merge``.

    options.py      TrainConfig: every option, its default, help and domain; config files; the generated parser
    models.py       model presets (minilm, gemma-3-270m), local folders and Hub ids, loaded from local files
    hub.py          Hugging Face Hub ids of models (ORG/NAME[@REVISION]) and data sets (hf:ORG/NAME[:SPLIT])
    targets.py      which modules get the adapter: found from the architecture; --targets all-linear
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

Nothing is downloaded but a Hub id given as --model or --task (hub.py; HF_HUB_OFFLINE=1 reads the Hugging Face
cache only): presets and folders are loaded with local_files_only.
"""
