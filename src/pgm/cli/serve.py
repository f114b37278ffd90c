"""`pgm serve`: a local web page and JSON API that stream generation (requests take the arguments
of `pgm sample`, by the same names)."""

from __future__ import annotations

import sys

from ..errors import ArgumentError
from ..sampling.compiled import compile_mode
from .common import add_loading_options


def register(commands) -> None:
    serve = commands.add_parser("serve", help="a local web page (and JSON API) that streams generation, and races "
                                              "two runs")
    serve.add_argument("sources", nargs="+", metavar="RUN", help="runs, pretrained directories or checkpoints to "
                                                                 "serve (text or image models)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="the port (0: a free one)")
    add_loading_options(serve)
    serve.add_argument("--max-samples", type=int, default=16, help="the most samples one request may ask for")
    serve.add_argument("--capacity", type=int, default=16, help="requests held at once; more are answered 503")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000,
                       help="the largest request body read (default 1 MB); larger ones are answered 413")
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    from ..pipeline import load
    from ..serve import exposure_warning, serve
    from ..serve.app import run_names

    for name, value in (("--max-samples", args.max_samples), ("--capacity", args.capacity),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise ArgumentError(f"{name} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port must lie in [0, 65535], got {args.port}")
    warning = exposure_warning(args.host)  # before loading: an unknown host costs no waiting for the models
    if warning:
        print(warning, file=sys.stderr, flush=True)
    pipelines = {}
    for name, source in zip(run_names(args.sources), args.sources):
        pipelines[name] = load(source, device=args.device, weights=args.weights, precision=args.precision,
                               compile=compile_mode(args.compile))
        print(f"loaded {name}: {pipelines[name]!r}", file=sys.stderr)
    serve(pipelines, host=args.host, port=args.port, max_samples=args.max_samples, capacity=args.capacity,
          max_body_bytes=args.max_body_bytes, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
