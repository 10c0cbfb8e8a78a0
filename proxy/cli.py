"""Command line: `signalbox serve | validate | mock`. Exit codes: 0 ok, 1 invalid policy, 2 usage."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from proxy.policy.compile import compile_plan
from proxy.policy.load import PolicyError, load_policy
from proxy.policy.units import parse_duration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signalbox", description="A policy-driven reverse proxy for LLM APIs.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--policies", default="policies", help="a policy file or a directory of them")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--admin-host", default="127.0.0.1")
    serve.add_argument("--admin-port", type=int, default=9090)
    serve.add_argument("--shutdown-grace", type=parse_duration, default=5.0, help="keep accepting after SIGTERM")
    serve.add_argument("--drain-timeout", type=parse_duration, default=60.0, help="wait for in-flight requests")
    serve.add_argument("--no-access-log", action="store_true", help="do not write the JSON access log")

    validate = commands.add_parser("validate", help="check a policy set and exit")
    validate.add_argument("path")

    mock = commands.add_parser("mock", help="run the built-in mock upstream on its own")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8000)
    mock.add_argument("--ttft-ms", type=float, default=0.0)
    mock.add_argument("--token-delay-ms", type=float, default=0.0)
    mock.add_argument("--output-tokens", type=int, default=16)

    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(Path(args.path))
    if args.command == "mock":
        from proxy.mock_upstream import MockSettings, run_mock_forever

        settings = MockSettings(
            ttft=args.ttft_ms / 1000, token_delay=args.token_delay_ms / 1000, output_tokens=args.output_tokens
        )
        run_mock_forever(settings, args.host, args.port)
        return 0
    return _serve(args)


def _validate(path: Path) -> int:
    try:
        loaded = load_policy(path)
        plan = compile_plan(loaded)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    print(
        f"ok: {len(loaded.files)} file(s), {len(plan.upstreams)} upstream(s), {len(plan.tenants)} tenant(s), "
        f"{len(plan.routes)} route(s); digest {plan.digest[:12]}"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.app import build_app, serve
    from proxy.runtime import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        plan = compile_plan(load_policy(args.policies))
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    settings = Settings(
        host=args.host,
        port=args.port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        shutdown_grace=args.shutdown_grace,
        drain_timeout=args.drain_timeout,
        access_log=not args.no_access_log,
    )
    app = build_app(plan, settings)
    uvloop.run(serve(app))
    return 0
