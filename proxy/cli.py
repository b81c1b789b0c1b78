"""The ``cachecar`` command: serve, check, origin, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.config import ConfigError, effective_yaml, load_settings
from proxy.settings import Settings
from proxy.units import parse_duration

DEFAULT_CONFIG = Path("config/cachecar.yaml")
EXIT_INVALID_CONFIG = 2


def default_config() -> Path:
    """``config/cachecar.yaml`` here if there is one, else the copy embedded in the package."""
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    embedded = resources.files("proxy").joinpath("cachecar.yaml")
    if embedded.is_file():
        return Path(str(embedded))
    # An editable install: the package is the checkout's proxy/, the file is beside it.
    return Path(__file__).resolve().parent.parent / DEFAULT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    command: int = args.run(args)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachecar",
        description="A caching sidecar: L1 in memory, L2 in Redis, in front of an HTTP origin.",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    _config_option(serve)
    serve.set_defaults(run=_serve)

    check = commands.add_parser(
        "check", help="validate a config and print the effective settings (exit 2 if invalid)"
    )
    _config_option(check)
    check.set_defaults(run=_check)

    origin = commands.add_parser("origin", help="run the demo data store (JSON REST over SQLite)")
    origin.add_argument("--host", default="127.0.0.1")
    origin.add_argument("--port", type=int, default=9000)
    origin.add_argument(
        "--latency", type=_duration, default=0.0, help="added to every request, e.g. 20ms"
    )
    origin.add_argument("--db", default=":memory:", help="SQLite file (default: in memory)")
    origin.set_defaults(run=_origin)

    demo = commands.add_parser(
        "demo", help="origin + proxy on the embedded default + traffic, with a live hit ratio"
    )
    demo.add_argument("--duration", type=_duration, default=None, help="stop after this long")
    demo.add_argument("--concurrency", type=int, default=8, help="clients generating traffic")
    demo.set_defaults(run=_demo)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"the YAML config (default: {DEFAULT_CONFIG}, else the embedded default)",
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _load(args: argparse.Namespace) -> Settings | None:
    path: Path = args.config or default_config()
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"cachecar: {exc.source} is not a valid config:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return EXIT_INVALID_CONFIG
    sys.stdout.write(effective_yaml(settings))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from proxy.listen import ListenError
    from proxy.server import serve

    settings = _load(args)
    if settings is None:
        return EXIT_INVALID_CONFIG
    try:
        # Workers (server.workers) are started with the same file.
        run(serve(settings, config=(args.config or default_config()).resolve()))
    except ListenError as exc:
        logging.getLogger("cachecar").error("%s", exc)
        return 1
    return 0


def _origin(args: argparse.Namespace) -> int:
    from aiohttp import web

    from proxy.demo.origin import build_origin_app

    log = logging.getLogger("cachecar.origin")
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        web.run_app(
            build_origin_app(args.db, args.latency),
            host=args.host,
            port=args.port,
            access_log=None,
            loop=loop,
            print=lambda _: log.info(
                "demo origin on http://%s:%d (latency %gms, db %s)",
                args.host,
                args.port,
                args.latency * 1000,
                args.db,
            ),
        )
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo.runner import Demo

    path = default_config()
    settings = _load(argparse.Namespace(config=path))
    if settings is None:
        return EXIT_INVALID_CONFIG
    demo = Demo(path, settings, concurrency=args.concurrency, duration=args.duration)
    result: int = run(demo.run())
    return result


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop where the platform has it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
