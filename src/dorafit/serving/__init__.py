"""Serving many adapters from one base model: the batching engine and the OpenAI-compatible HTTP API.

    engine.py   continuous batching: chunked prefill, one decode forward for all rows, one adapter per row
    kv.py       the engine's KV cache: one preallocated, right-aligned batch buffer per layer (sliding layers too)
    logprobs.py log-probabilities in OpenAI's response shapes
    api.py      the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (streaming), /health
    load.py     the base model and its named adapters (run folders or adapter folders), with their chat formats
    params.py   the request body: strict JSON, every OpenAI parameter honoured or refused by name, the context budget
    security.py API key, content type and body size, checked before any route
    errors.py   OpenAI's error body for every failure
    adapter_admin.py   adapters loaded and unloaded at run time (--adapter-root)
"""
