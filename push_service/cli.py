"""Command line: `push-service serve | token | publish`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import multiprocessing
import os
import secrets
import shlex
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine
from typing import Any

import orjson

from push_service import __version__
from push_service.auth import mint_token
from push_service.config import OPTIONS, Settings, parse_duration
from push_service.errors import ConfigError

EXIT_CONFIG = 2
# Where `publish` finds a running service; dev mode's banner prints it, as do the examples read it.
URL_VARIABLE = "PUSH_URL"


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each flag overrides its environment variable)")
    for option in OPTIONS:
        group.add_argument(option.flag, dest=option.env, metavar="VALUE", help=f"{option.env}: {option.help}")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {option.env: value for option in OPTIONS if (value := getattr(args, option.env, None)) is not None}
    return Settings.load(overrides=overrides)


def _with_dev_keys(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """In development, generate whatever key is missing, for this run only."""
    generated: dict[str, str] = {}
    if not settings.service_keys:
        generated["PUSH_SERVICE_KEY"] = secrets.token_urlsafe(32)
    if not (settings.jwt_secret or settings.jwt_public_key):
        generated["PUSH_JWT_SECRET"] = secrets.token_urlsafe(48)
    if not settings.admin_keys and settings.env != "production":  # production: the admin API stays off
        generated["PUSH_ADMIN_KEY"] = secrets.token_urlsafe(32)
    if not generated:
        return settings, generated
    settings = settings.replace(
        service_keys=settings.service_keys or (generated.get("PUSH_SERVICE_KEY", ""),),
        admin_keys=settings.admin_keys or (generated.get("PUSH_ADMIN_KEY", ""),),
        jwt_secret=settings.jwt_secret or generated.get("PUSH_JWT_SECRET"),
        dev_mode=True,
    )
    return settings, generated


def _local_url(settings: Settings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{port}"


def _dev_banner(settings: Settings, generated: dict[str, str], port: int) -> str:
    base = _local_url(settings, port)
    exports = {**generated, URL_VARIABLE: base}
    lines = ["", "push-service is running in DEV MODE: these keys were generated for this run only.",
             "Set them (or PUSH_ENV=production with your own) for anything real.", "",
             "  Paste these into another shell, and `push-service token` and `push-service publish` work there:"]
    lines += [f"  export {name}={shlex.quote(value)}" for name, value in exports.items()]
    if settings.jwt_secret and not settings.jwt_public_key:
        token = mint_token(settings, "dev", ttl=24 * 3600)
        lines += ["", "  client token (sub=dev, valid 24h):", f"  {token}", "",
                  "  connect:", f"  {base.replace('http', 'ws', 1)}/socket/websocket?vsn=2.0.0&token={token}"]
    if "PUSH_SERVICE_KEY" in generated:
        key = generated["PUSH_SERVICE_KEY"]
        lines += ["", "  publish:",
                  f"  curl -sS -X POST {base}/api/message -H 'Authorization: Bearer {key}' "
                  "-H 'Content-Type: application/json' -d '{\"channel_id\":\"42\",\"message\":\"hello\"}'"]
    if "PUSH_ADMIN_KEY" in generated:
        lines += ["", "  admin API and console (the admin key):",
                  f"  curl -sS {base}/api/admin/nodes -H 'Authorization: Bearer {generated['PUSH_ADMIN_KEY']}'",
                  f"  {base}/console"]
    return "\n".join(lines) + "\n"


def cmd_serve(args: argparse.Namespace) -> int:
    from push_service import app, logs

    settings = _settings(args)
    settings, generated = _with_dev_keys(settings)
    logs.setup(settings.log_level, settings.log_format)

    def announce(port: int) -> None:
        if generated:
            # Straight to the terminal, never through the logger: logs must not carry secrets.
            sys.stdout.write(_dev_banner(settings, generated, port))
            sys.stdout.flush()

    if settings.workers > 1:
        if settings.port == 0:
            raise ConfigError("PUSH_PORT", "several workers need a fixed port to share (not 0)")
        announce(settings.port)
        return _run_workers(settings)
    try:
        run(app.serve(settings, announce))
    except app.ListenError as exc:
        print(f"push-service: {exc}", file=sys.stderr)
        return 1
    return 0


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run the server on uvloop (a default dependency where it builds), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        _log_runtime("asyncio")
        asyncio.run(main)
        return
    _log_runtime(f"uvloop {uvloop.__version__}")
    uvloop.run(main)


def _log_runtime(loop: str) -> None:
    """Say what the process runs on: a slower fallback should be seen in the first lines of the log."""
    from importlib.metadata import PackageNotFoundError, version
    import logging

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return "none"

    logging.getLogger("push_service").info("runtime", extra={
        "event": "runtime", "python": sys.version.split()[0], "loop": loop,
        "http_parser": f"llhttp ({installed('httptools')})", "redis_parser": installed("hiredis")})


def _worker(settings: Settings) -> None:
    from push_service import app, logs

    logs.setup(settings.log_level, settings.log_format)
    run(app.serve(settings, reuse_port=True))


def _run_workers(settings: Settings) -> int:
    """N processes, each its own node on the broker, each with its own SO_REUSEPORT socket on one port."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(settings,), name=f"push-worker-{n}", daemon=False)
               for n in range(settings.workers)]
    for worker in workers:
        worker.start()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # One worker dying unasked for takes the others down, so the supervisor (Kubernetes, systemd)
    # restarts the whole set rather than leave a partial one running.
    while any(worker.is_alive() for worker in workers):
        for worker in workers:
            worker.join(timeout=0.2)
            if not stopping and worker.exitcode is not None:
                stop(signal.SIGTERM, None)
    codes = [worker.exitcode or 0 for worker in workers]
    return 0 if stopping and all(code == 0 for code in codes) else max(1, *codes)


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(flag, "must be a JSON object")
    return value


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings(args)
    info = _json_object(args.info, "--info") if args.info else None
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise ConfigError("--ttl", str(exc)) from None
    private_key = None
    if args.private_key:
        with open(args.private_key, encoding="utf-8") as handle:
            private_key = handle.read()
    try:
        token = mint_token(settings, args.sub, ttl=ttl, topics=args.topics, info=info, private_key=private_key,
                           algorithm=args.algorithm)
    except ValueError as exc:
        raise ConfigError("PUSH_JWT_SECRET", str(exc)) from None
    print(token)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = _json_object(args.data, "--data")
    if args.topic:
        path, body = "/api/broadcast", {"topic": args.topic, "event": args.event, "payload": data}
    elif args.channel:
        path, body = "/api/channel", {**data, "channel_id": args.channel}
    elif args.thread:
        path, body = "/api/thread", {**data, "thread_id": args.thread}
    else:
        raise ConfigError("--channel", "give --channel, --thread or --topic")
    key = args.key or (settings.service_keys[0] if settings.service_keys else None)
    if not key:
        raise ConfigError("PUSH_SERVICE_KEY", "the publish key is needed (or --key)")
    base = args.url or os.environ.get(URL_VARIABLE) or _local_url(settings, settings.port)
    url = base.rstrip("/") + path
    request = urllib.request.Request(url, data=orjson.dumps(body), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"HTTP {exc.code}: {exc.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"push-service: cannot reach {url}: {exc.reason}", file=sys.stderr)
        return 1


def installed_version() -> str:
    """The version pip installed; a source tree run without installing has only the package's own."""
    try:
        return importlib.metadata.version("push-service")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="push-service", description=__doc__)
    parser.add_argument("--version", action="version", version=f"push-service {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service",
                                description="Run the push service. With no configuration it starts in dev mode "
                                            "on 127.0.0.1:4000 with generated keys.")
    _add_setting_flags(serve)
    serve.set_defaults(func=cmd_serve)

    token = commands.add_parser("token", help="mint a client JWT with the configured key",
                                description="Mint a client JWT. The key and the claims' settings come from the "
                                            "environment: PUSH_JWT_SECRET, PUSH_JWT_ALGORITHMS, PUSH_JWT_AUDIENCE, "
                                            "PUSH_JWT_ISSUER.")
    token.add_argument("--sub", required=True, help="the user id (JWT sub)")
    token.add_argument("--topics", nargs="+", help="topics or prefixes ending in * this token may join")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 86400 (default 1h)")
    token.add_argument("--info", help="JSON object shown in presence, e.g. '{\"username\":\"ada\"}'")
    token.add_argument("--private-key", help="PEM private key file for RS/ES/EdDSA (default: PUSH_JWT_SECRET)")
    token.add_argument("--algorithm", help="signing algorithm (default: the first configured one)")
    token.set_defaults(func=cmd_token)

    publish = commands.add_parser("publish", help="publish a message to a running service",
                                  description=f"Publish to a running service: at --url or {URL_VARIABLE}, with "
                                              "--key or PUSH_SERVICE_KEY.")
    target = publish.add_mutually_exclusive_group(required=True)
    target.add_argument("--channel", help="channel id: new_msg on room:lobby:<id>")
    target.add_argument("--thread", help="thread id: new_msg on room:topic:<id>")
    target.add_argument("--topic", help="any topic (with --event)")
    publish.add_argument("--event", default="new_msg", help="event name with --topic (default new_msg)")
    publish.add_argument("--data", default="{}", help="JSON object to send")
    publish.add_argument("--url", help=f"service base URL (default: {URL_VARIABLE}, else http://PUSH_HOST:PUSH_PORT)")
    publish.add_argument("--key", help="publish key (default: PUSH_SERVICE_KEY)")
    publish.set_defaults(func=cmd_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"push-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
