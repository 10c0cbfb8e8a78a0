"""Command line: `signalbox serve | validate | mock`. Exit codes: 0 ok, 1 invalid policy, 2 usage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from proxy.policy.compile import compile_plan
from proxy.policy.load import PolicyError, load_policy
from proxy.policy.units import parse_duration, parse_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signalbox", description="A policy-driven reverse proxy for LLM APIs.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--policies", default="policies", help="a policy file or a directory of them")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--admin-host", default="127.0.0.1")
    serve.add_argument("--admin-port", type=int, default=9090)
    serve.add_argument(
        "--admin-no-auth", action="store_true",
        help="serve the admin API without SIGNALBOX_ADMIN_TOKEN (only with a loopback --admin-host)",
    )
    serve.add_argument("--shutdown-grace", type=parse_duration, default=5.0, help="keep accepting after SIGTERM")
    serve.add_argument("--drain-timeout", type=parse_duration, default=60.0, help="wait for in-flight requests")
    serve.add_argument("--no-access-log", action="store_true", help="do not write the JSON access log")
    serve.add_argument("--demo", action="store_true", help="serve the stream demo page at /signalbox/v1/demo")
    serve.add_argument(
        "--reload-interval", type=parse_duration, default=2.0, help="how often to check the policies for changes"
    )
    _client_timeout_flags(serve)
    serve.add_argument(
        "--resume-max-bytes", type=parse_size, default=256 * 1024 * 1024,
        help="bytes of events held for resumable streams across the process (default 256MiB)",
    )
    serve.add_argument(
        "--resume-max-detached", type=int, default=1000,
        help="resumable generations that may run on without their client at once (default 1000)",
    )

    validate = commands.add_parser("validate", help="check a policy set and exit")
    validate.add_argument("path")

    explain = commands.add_parser("explain", help="show which route, upstream and settings a request gets")
    explain.add_argument("--policies", default="policies")
    explain.add_argument("--model", default="", help="the request's model (leave out for a request without one)")
    explain.add_argument("--path", default="/v1/chat/completions")
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--tenant", help="the tenant (default: the only one, or identify.tenant)")
    who.add_argument("--key", help="a tenant's API key (used only to find the tenant; never printed)")
    explain.add_argument("--json", action="store_true", help="print JSON instead of text")

    commands.add_parser("schema", help="print the JSON Schema of the policy format")

    from proxy.mock.flags import add_mock_arguments  # argparse only: the server is imported when it runs

    mock = commands.add_parser(
        "mock", help="run the built-in mock upstream on its own",
        description="The built-in mock upstream: OpenAI chat, completions, Responses and embeddings, and Anthropic "
        "messages, with scripted timing and faults.",
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8000)
    add_mock_arguments(mock)

    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(Path(args.path))
    if args.command == "explain":
        return _explain(args)
    if args.command == "schema":
        from proxy.policy.schema_docs import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "mock":
        from proxy.mock.flags import settings_from
        from proxy.mock.server import run_mock_forever

        run_mock_forever(settings_from(args), args.host, args.port)
        return 0
    return _serve(args)


def _client_timeout_flags(serve: argparse.ArgumentParser) -> None:
    """How long a client may take over a request and sit idle (defaults and why: proxy.runtime.ClientTimeouts)."""
    from proxy.runtime import ClientTimeouts

    default = ClientTimeouts()
    for flag, value, what in (
        ("--header-timeout", default.header, "for a request's line and headers to arrive"),
        ("--body-idle-timeout", default.body_idle, "a request body may go without a byte"),
        ("--body-timeout", default.body, "for a whole request body to arrive"),
        ("--keepalive-timeout", default.keepalive, "an idle connection is kept between requests"),
    ):
        serve.add_argument(flag, type=_positive_duration, default=value, help=f"how long {what} (default {value:g}s)")


def _positive_duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 (such as 500ms or 10s)")
    return seconds


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


def _explain(args: argparse.Namespace) -> int:
    from proxy.policy.explain import ExplainError, explain
    from proxy.policy.explain_text import format_text

    try:
        loaded = load_policy(args.policies)
        plan = compile_plan(loaded)
        answer = explain(
            loaded, plan, model=args.model, path=args.path, tenant=args.tenant, key=args.key,
            stream_defaults=_stream_defaults(),
        )
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except ExplainError as exc:
        print(f"explain: {exc}", file=sys.stderr)
        return 2
    print(plan.secrets.scrub_text(json.dumps(answer, indent=2) if args.json else format_text(answer)))
    return 0


def _stream_defaults() -> dict[str, float]:
    """What `serve` uses when a route sets no `stream:` (explain shows it as the process setting)."""
    from proxy.streaming.relay import StreamSettings

    defaults = StreamSettings()
    return {"heartbeat": defaults.heartbeat, "slow_client": defaults.slow_client}


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from proxy.app import build_app, serve
    from proxy.policy.reload import Reloader
    from proxy.runtime import STATE, ClientTimeouts, Settings
    from proxy.streaming.relay import StreamSettings
    from proxy.telemetry.tracing import TracingConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.admin_no_auth:
        if not _binds_loopback_only(args.admin_host):
            host = args.admin_host
            print(f"--admin-no-auth needs a loopback --admin-host (127.0.0.1, ::1), not {host}", file=sys.stderr)
            return 2
        print(f"warning: the admin API is open without a token on {args.admin_host}:{args.admin_port} "
              "(--admin-no-auth, for development only; set SIGNALBOX_ADMIN_TOKEN elsewhere)", file=sys.stderr)
    try:
        loaded = load_policy(args.policies)
        plan = compile_plan(loaded)
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
        reload_interval=args.reload_interval,
        admin_auth_disabled=args.admin_no_auth,
        demo=args.demo,
        client_timeouts=ClientTimeouts(
            header=args.header_timeout, body_idle=args.body_idle_timeout, body=args.body_timeout,
            keepalive=args.keepalive_timeout,
        ),
        stream=StreamSettings(resume_max_bytes=args.resume_max_bytes, resume_max_detached=args.resume_max_detached),
    )
    try:
        app = build_app(plan, settings)
    except TracingConfigError as exc:  # the OTEL_* variables ask for what the proxy cannot do
        print(f"tracing: {exc}", file=sys.stderr)
        return 2
    runtime = app[STATE]
    runtime.reloader = Reloader(Path(args.policies), loaded, runtime.plans.swap)
    _tune_gc()
    try:
        uvloop.run(serve(app))
    except OSError as exc:  # a port in use or not ours to bind: one line, not a traceback
        print(f"cannot listen: {exc.strerror or exc} (--host {args.host} --port {args.port}, "
              f"--admin-host {args.admin_host} --admin-port {args.admin_port})", file=sys.stderr)
        return 2
    return 0


def _binds_loopback_only(host: str) -> bool:
    """Every address the admin site would bind is a loopback one. A name is resolved as the server will
    resolve it, so a `localhost` mapped elsewhere in /etc/hosts is refused, not opened."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {info[4][0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def _tune_gc() -> None:
    """Fewer, cheaper cyclic collections for a long-running server (about 10 % CPU per request, measured
    with bench/overhead.py). Each request allocates a few hundred short-lived containers that reference
    counting frees; with the default gen-0 threshold (700) the collector still runs every few requests
    and rescans what survived. Everything loaded at start-up (modules, schemas, the plan) is frozen out of
    the scans; the threshold is raised so a collection runs every ~10,000 net allocations instead."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
