"""``dorafit serve``: an OpenAI-compatible server of one base model and many adapters, batched together."""

from __future__ import annotations

import argparse

from ..quantize import KINDS as QUANTIZE_KINDS
from .common import add_compute_arguments

API_KEY_ENV = "DORAFIT_API_KEY"  # as vLLM's VLLM_API_KEY
DEFAULT_MAX_BODY_MB = 4.0

EPILOG = """\
examples:
  dorafit serve --model gemma-3-270m --adapter headlines=runs/headlines --adapter chat=runs/chat
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "headlines", "messages": [{"role": "user", "content": "..."}]}'
  dorafit serve --model my-llava --adapter colours=runs/colours    # a vision-language model: chat messages take
      # OpenAI's image_url parts, {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
  DORAFIT_API_KEY=secret dorafit serve --model gemma-3-270m --host 0.0.0.0 --adapter-root runs
  curl http://HOST:8000/v1/load_lora_adapter -H 'Authorization: Bearer secret' -H 'Content-Type: application/json' \\
      -d '{"lora_name": "chat", "lora_path": "chat"}'
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Load a base model once and any number of adapters beside it (LoRA, DoRA, VeRA, DVoRA: DoRA's "
        "norms cached), and answer /v1/completions and /v1/chat/completions (streaming too). The request's "
        "'model' picks the adapter; requests that arrive together are batched, one forward per generated token for "
        "all of them, each row with its own adapter.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="PRESET|DIR|ORG/NAME",
                        help="the base model: a preset, a folder or a Hugging Face Hub id ORG/NAME[@REVISION]")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_OR_ADAPTER_DIR",
                        help="an adapter to serve under NAME: a run folder of dorafit train (its chat template comes "
                        "along) or an adapter folder; repeat for more")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens the server "
                        "to the network: set an API key)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests generated at once (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="a request's max_tokens when it gives none (default: 256)")
    add_compute_arguments(parser, device="cpu", devices=None, device_help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16", "float64"),
                        help="the base's dtype; adapters beside a bfloat16 or float16 base stay float32 (default: the "
                        "--dtype the adapter runs trained in, float32 if they differ; auto: bfloat16 on a CUDA GPU "
                        "that supports it, float32 on a CPU)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_KINDS,
                        help="hold the base quantized with bitsandbytes (nf4, fp4 or int8), shared by every adapter; "
                        "runs trained with dorafit train --quantize need the same")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on every route but GET /health (default: the "
                        f"{API_KEY_ENV} environment variable, which keeps the key out of the process list; unset: "
                        "no key)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                        help=f"largest request body; larger ones get 413 unread (default: {DEFAULT_MAX_BODY_MB:g})")
    parser.add_argument("--adapter-root", default=None, metavar="DIR",
                        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter for run, dorafit or "
                        "PEFT adapter folders under DIR (default: the routes do not exist)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens prefilled per step: a long prompt is prefilled in chunks between decode "
                        "steps, so running requests keep producing tokens and a new request waits at most one "
                        "chunk (default: 64 on a CPU, 512 on a GPU)")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                        help="a vision-language model: the largest request image, width x height in pixels; larger "
                        "ones get a 400 before their pixels are decoded (default: 16777216, 4096 x 4096)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="a vision-language model: fetch image_url parts with http(s):// URLs (at most "
                        "--max-body-mb each, 10 s timeout); without it only data: URLs are read and remote ones "
                        "get a 400. Lets clients make the server fetch any URL it can reach")
    parser.add_argument("--pack-weights", action="store_true",
                        help="CPU: batched decode steps compute the linear layers through oneDNN with each float32 "
                        "weight packed once for its kernels: faster where MKL is slow for a few rows (AMD CPUs); a "
                        "second copy of the weights in memory; rounding differs from the default kernels")
    parser.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C, requests in flight get this long to finish, then fail with a 503 "
                        "(default: 10; a second signal stops at once)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        import logging
        import os
        import signal
        import socket
        import sys
        import threading
        import time
        from pathlib import Path

        import torch

        if not args.shutdown_grace >= 0:
            raise ValueError(f"--shutdown-grace must be a number of seconds >= 0, got {args.shutdown_grace}")
        for name in ("max_batch_size", "max_new_tokens", "prefill_chunk", "max_image_pixels"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
        from ..serving.security import Guard

        given = args.api_key is not None  # an empty DORAFIT_API_KEY is unset, an empty --api-key an error
        key = args.api_key if given else os.environ.get(API_KEY_ENV) or None
        guard = Guard.from_options(key, "--api-key" if given else API_KEY_ENV, args.max_body_mb)
        root = Path(args.adapter_root).expanduser() if args.adapter_root else None
        if root is not None and not root.is_dir():
            raise ValueError(f"--adapter-root {args.adapter_root}: no such folder; give the folder that holds the "
                             "adapters to load at run time")
        if args.threads:
            torch.set_num_threads(args.threads)
        engine_log = logging.getLogger("dorafit.serve")  # failed generations, with their tracebacks, on stderr
        if not engine_log.handlers:
            engine_log.addHandler(logging.StreamHandler(sys.stderr))
        import uvicorn

        from ..serving.api import create_app
        from ..serving.images import ImageOptions
        from ..serving.load import build_served
        images = ImageOptions(args.max_image_pixels, args.allow_remote_images, guard.max_body)
        served = build_served(args.model, args.adapter, args.device, args.dtype, args.max_batch_size,
                              args.max_new_tokens, args.quantize, prefill_chunk=args.prefill_chunk, images=images,
                              pack_weights=args.pack_weights)
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}; choose another --port") \
                from None
        port = sock.getsockname()[1]
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        names = ", ".join([served.base_name, *served.adapters])
        server = uvicorn.Server(uvicorn.Config(create_app(served, guard, root), log_level="warning",  # time to send
                                               timeout_graceful_shutdown=args.shutdown_grace + 5))  # the 503s
        web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dorafit-http", daemon=True)
        web.start()  # HTTP in a thread; the engine in this one, where torch computes fastest (Engine.run)
        print(f"serving {names} on http://{args.host}:{port}/v1 (max batch {args.max_batch_size}); "
              "SIGTERM or Ctrl-C stops it", file=sys.stderr, flush=True)
        if guard.api_key is None and not _loopback(args.host):
            print(f"warning: {args.host} is reachable from other machines and no API key is set: anyone who can "
                  f"reach port {port} can use the model; set {API_KEY_ENV} or --api-key", file=sys.stderr, flush=True)

        deadline = []  # when the requests still in flight are failed (503)

        def shut_down(signum, frame):  # uvicorn stops accepting and waits for the requests in flight; they get the
            if server.should_exit:      # grace period to finish, then fail; a second signal stops at once
                server.force_exit = True
            server.should_exit = True
            deadline.append(time.monotonic() + args.shutdown_grace)

        def web_ended() -> bool:  # checked by the engine loop between steps, in this thread
            if deadline and time.monotonic() > deadline[0] and not served.engine.stopping:
                served.engine.drain("the server is shutting down")
            return not web.is_alive()

        previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            served.engine.run(until=web_ended)  # generates until uvicorn has ended
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.should_exit = True
            web.join(timeout=args.shutdown_grace + 10)
            served.engine.stop()
        print("server stopped", file=sys.stderr, flush=True)
        return 0

    return report_errors(command)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
