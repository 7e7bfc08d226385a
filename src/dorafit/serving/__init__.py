"""Serving many adapters from one base model: the batching engine and the OpenAI-compatible HTTP API.

    engine.py   continuous batching: chunked prefill, one decode forward for all rows, one adapter per row
    kv.py       the engine's KV cache: one preallocated, right-aligned batch buffer per layer (sliding layers too)
    logprobs.py log-probabilities in OpenAI's response shapes
    api.py      the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (streaming), /health
    load.py     the base model and its named adapters (run folders or adapter folders), with their chat formats
"""
