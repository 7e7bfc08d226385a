"""Serving many adapters from one base model: the batching engine and the OpenAI-compatible HTTP API.

    engine.py   continuous batching with a KV cache per request and one adapter per batch row
    api.py      the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (streaming), /health
    load.py     the base model and its named adapters (run folders or adapter folders), with their chat formats
"""
