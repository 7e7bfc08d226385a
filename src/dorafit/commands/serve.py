"""``dorafit serve``: an OpenAI-compatible server of one base model and many adapters, batched together."""

from __future__ import annotations

import argparse

from ..quantize import KINDS as QUANTIZE_KINDS

EPILOG = """\
examples:
  dorafit serve --model gemma-3-270m --adapter headlines=runs/headlines --adapter chat=runs/chat
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "headlines", "messages": [{"role": "user", "content": "..."}]}'
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
    parser.add_argument("--model", required=True, metavar="PRESET|DIR", help="the base model: a preset or a folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_OR_ADAPTER_DIR",
                        help="an adapter to serve under NAME: a run folder of dorafit train (its chat template comes "
                        "along) or an adapter folder; repeat for more")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests generated at once (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="a request's max_tokens when it gives none (default: 256)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16", "float64"),
                        help="the base's dtype; adapters beside a bfloat16 or float16 base stay float32 (default: the "
                        "--dtype the adapter runs trained in, float32 if they differ; auto: bfloat16 on a CUDA GPU "
                        "that supports it, float32 on a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_KINDS,
                        help="hold the base quantized with bitsandbytes (nf4, fp4 or int8), shared by every adapter; "
                        "runs trained with dorafit train --quantize need the same")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        import signal
        import socket
        import sys
        import threading

        import torch

        for name in ("max_batch_size", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
        if args.threads:
            torch.set_num_threads(args.threads)
        import uvicorn

        from ..serving.api import create_app
        from ..serving.load import build_served

        served = build_served(args.model, args.adapter, args.device, args.dtype, args.max_batch_size,
                              args.max_new_tokens, args.quantize)
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
        server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
        web = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dorafit-http", daemon=True)
        web.start()  # HTTP in a thread; the engine in this one, where torch computes fastest (Engine.run)
        print(f"serving {names} on http://{args.host}:{port}/v1 (max batch {args.max_batch_size}); "
              "SIGTERM or Ctrl-C stops it", file=sys.stderr, flush=True)

        def shut_down(signum, frame):  # uvicorn stops accepting, lets requests in flight finish, then ends
            server.should_exit = True

        previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            served.engine.run(until=lambda: not web.is_alive())  # generates until uvicorn has ended
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            server.should_exit = True
            web.join(timeout=30)
            served.engine.stop()
        print("server stopped", file=sys.stderr, flush=True)
        return 0

    return report_errors(command)
