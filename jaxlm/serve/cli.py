"""`python -m jaxlm.serve MODEL`: an OpenAI-compatible HTTP server for a model, on 127.0.0.1 unless told.

The socket is bound first (a port in use is a one-line error), then uvicorn serves while the model loads
and every program compiles on a background thread, `/health` answering 503 until then; the log names
each program compiled and its time (XLA's persistent compilation cache makes a restart quicker).
SIGTERM stops taking new connections, lets the requests in flight finish, and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import socket
import threading
import time

from ..cli import run_cli
from ..config import ATTENTIONS, DTYPES
from ..errors import JaxlmError
from ..kernels import expected_platform
from ..kernels import resolve as resolve_kernels

EXTRA = "python -m jaxlm.serve needs FastAPI, uvicorn, prometheus-client and Jinja2: pip install 'jaxlm[serve]'"
log = logging.getLogger("jaxlm.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxlm.serve",
        description="Serve a model over OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models) "
        "with continuous batching; GET / is a page to try it by hand, /health and /metrics watch it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="what jaxlm.load accepts: an HF hub id or directory, a jaxlm checkpoint, a run dir")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory, merged into MODEL")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, logged)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (the batch of a decode step)")
    p.add_argument(
        "--max-len", type=int, default=None, help="prompt + new tokens per sequence at most (None: the model's context)"
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and KV cache")
    p.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTIONS,
        help="the prompts' attention kernel: auto picks by platform and dtype (jaxlm.kernels); each new token "
        "attends over the slot's cache in chunks",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("JAXLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API (default: $JAXLM_API_KEY, else no key)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting for a slot before 429s")
    p.add_argument("--model-name", default=None, help="the model id clients send (None: MODEL as given)")
    p.add_argument(
        "--chat-template", default=None, help="a Jinja2 chat template file (None: the plain 'Role: text' lines)"
    )
    p.add_argument(
        "--prefill-budget",
        type=int,
        default=256,
        help="prompt tokens prefilled between two decode steps while sequences are decoding (at least one prompt)",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="leave glibc's malloc at its default of returning freed blocks to the OS (by default the server "
        "keeps them, as the eval does: XLA:CPU's per-call buffers then stop page-faulting, and a long-running "
        "server's memory does not creep up with fragmentation)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    return p


def _check_args(args):
    for name, lo in (("slots", 1), ("max_queue", 1), ("prefill_budget", 1), ("max_body_bytes", 1024)):
        if getattr(args, name) < lo:
            raise JaxlmError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise JaxlmError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise JaxlmError("--api-key is empty; give a key or leave the flag out")


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise JaxlmError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host or --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise JaxlmError(EXTRA) from None
    from ..io import load as loader
    from ..lora import peft as peft_io
    from .app import State, create_app
    from .chat import ChatTemplate

    chat = ChatTemplate(args.chat_template)  # a bad template fails before anything loads
    if args.adapter:
        peft_io.check_adapter(args.adapter)
    kind, path = loader.resolve(args.model)
    config = loader.read_config(path if kind == "hf" else args.model)
    max_len = config.block_size if args.max_len is None else args.max_len
    if not 2 <= max_len <= config.block_size:
        raise JaxlmError(f"--max-len must be in 2..{config.block_size} (the model's context), got {max_len}")

    resolve_kernels(None, dtype=args.dtype, attention=args.attention)  # an impossible --attention: before loading

    sock = _listen(args.host, args.port)
    if not args.return_freed_memory and expected_platform() == "cpu":
        from ..cpu.allocator import keep_freed_memory

        keep_freed_memory()  # a CPU tuning, before the weights load and XLA's threads start
    host, port = sock.getsockname()[:2]
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["jaxlm.serve"] = {
        "handlers": ["default"],
        "level": args.log_level.upper(),
        "propagate": False,
    }
    state = State(args.model_name or args.model, api_key=args.api_key, max_body=args.max_body_bytes)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state), log_config=log_config, log_level=args.log_level, access_log=not args.no_access_log,
            timeout_keep_alive=30,
        )
    )  # fmt: skip
    failed: list[BaseException] = []

    def load():
        try:
            _load(args, state, path if kind == "hf" else args.model, max_len, chat, f"http://{host}:{port}")
        except BaseException as e:  # handed to the main thread, which exits with it
            failed.append(e)
            server.should_exit = True

    log.info("listening on http://%s:%d (model %s loading; /health answers 503 until it is ready)", host, port,
             args.model)  # fmt: skip
    threading.Thread(target=load, name="jaxlm-serve-load", daemon=True).start()
    signal.signal(signal.SIGTERM, _exit_cleanly)  # uvicorn raises it again once it has shut down
    server.run(sockets=[sock])
    if failed:
        raise failed[0]
    return 0


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


def _load(args, state, source, max_len, chat, url):
    import jax

    from ..generation import decode
    from ..io import load as loader
    from ..kernels import placed_on
    from ..tokenizer import from_spec
    from .app import Served
    from .engine import Engine
    from .programs import Programs, for_serving

    if jax.config.jax_compilation_cache_dir is None:
        from ..utils.cache import cache_dir

        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    t0 = time.perf_counter()
    config, params, spec = loader.load_with_tokenizer(source, adapter=args.adapter)
    if args.dtype != config.dtype:
        config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    tokenizer = from_spec(spec)
    kernels = resolve_kernels(placed_on(params), dtype=config.dtype, attention=args.attention, decode=True)
    kernels = for_serving(kernels, config.dtype)
    dp = decode.prepare(params, config, kernels)
    del params
    log.info("loaded %s in %.1f s (%s, %d layers, d=%d)", args.model, time.perf_counter() - t0, config.dtype,
             config.n_layer, config.n_embd)  # fmt: skip
    log.info("kernels: %s", kernels.describe("attention", "decode_products"))
    programs = Programs(dp, config, args.slots, max_len, kernels)
    cache_bytes = 2 * config.n_layer * args.slots * max_len * config.n_embd * jax.numpy.dtype(config.dtype).itemsize
    log.info("KV cache: %d slots x %d tokens (%.0f MiB)", args.slots, max_len, cache_bytes / 2**20)
    t1 = time.perf_counter()
    programs.compile_all(log.info)
    log.info("compiled %d programs in %.1f s", len(programs.exe), time.perf_counter() - t1)
    engine = Engine(programs, max_queue=args.max_queue, prefill_budget=args.prefill_budget)
    engine.start()
    state.on_shutdown.append(engine.stop)
    eos = getattr(tokenizer, "eot_id", None)
    eos = eos if eos is not None and eos < config.vocab_size else None
    state.served = Served(engine, tokenizer, config.vocab_size, max_len, eos, chat)
    log.info("ready in %.1f s: %s serves %r", time.perf_counter() - t0, url, state.name)


def cli() -> int:
    return run_cli(main)
