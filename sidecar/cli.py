"""The command line: one function per command. User errors are one line each, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sidecar import __version__
from sidecar.config import ConfigError, Settings, load_config
from sidecar.tokens.base import IdentityError, SignIn

EXIT_OK, EXIT_TOKEN, EXIT_CONFIG = 0, 1, 2
DEMO_NEEDS_EMULATORS = "the demo needs the emulators: pip install ./emulators (or run `make demo` from a checkout)"
T = TypeVar("T")


def _load(args: argparse.Namespace) -> Settings:
    settings = load_config(args.config)
    from sidecar import logs

    logs.configure(settings.logging.level, settings.logging.format, settings.secret_values())
    return settings


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux default dependency
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _no_caller(settings: Settings) -> IdentityError:
    return IdentityError(
        f"auth.flow={settings.auth.flow.value} gets tokens per caller; `check`/`token` have no caller token",
        retryable=False,
        hint="use `sidecar serve` and send the user's token in the Authorization header",
    )


async def _one_token(settings: Settings, *, for_check: bool) -> tuple[str, str | None]:
    """A token with no caller, and a note when it is not the kind requests get: `check` accepts what a per-caller
    flow proves instead (Authorizer.check); `token` must print a token for the upstream, which needs a caller."""
    from sidecar.tokens import build_authorizer

    authorizer = build_authorizer(settings)
    try:
        if authorizer.takes_caller_bearer and not for_check:
            raise _no_caller(settings)
        return await authorizer.check()
    finally:
        await authorizer.aclose()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load(args)
    workers = settings.worker_count()
    if settings.workers == "auto":
        logging.getLogger("sidecar").info("workers: auto -> %d (the cgroup's CPU quota and memory limit)", workers)
    if workers > 1:
        from sidecar.workers import run_workers

        return run_workers(settings, workers, _run)
    from sidecar.server import serve

    return _run(serve(settings, whole_process=True))


def cmd_check(args: argparse.Namespace) -> int:
    from sidecar.claims import describe

    settings = _load(args)
    upstreams = ", ".join(f"{route.prefix} -> {route.upstream[0].url}" for route in settings.effective_routes())
    print(f"config ok: flow {settings.auth.flow.value}, scope {settings.auth.scope}, upstream {upstreams}")
    token, note = _run(_one_token(settings, for_check=True))
    if note:
        print(note)
    print("token acquired; its claims:")
    for name, value in describe(token):
        print(f"  {name:<18} {value}")
    if not args.upstream:
        return EXIT_OK
    if note:  # the token shown is not one the upstream would get: callers bring their own
        print("upstream not checked: this flow's upstream tokens belong to callers")
        return EXIT_OK
    lines = _run(_probe_routes(settings, token))
    for _, line in lines:
        print(line)
    return EXIT_OK if all(ok for ok, _ in lines) else EXIT_TOKEN


async def _probe_routes(settings: Settings, token: str) -> list[tuple[bool, str]]:
    """One probe per route (its first backend), with a token for the route's scope: the one `check` got for
    auth.scope, or one more from the same flow for another scope."""
    from sidecar import doctor
    from sidecar.config import audience_of
    from sidecar.tls import client_ssl_context
    from sidecar.upstream import Pool

    ssl_context = client_ssl_context(settings.tls.ca_bundle)
    results: list[tuple[bool, str]] = []
    for route in settings.effective_routes():
        scope = route.scope or settings.auth.scope
        if not route.probe_path:
            results.append((True, f"{route.prefix}: not checked (the route has no probe_path)"))
            continue
        if scope != settings.auth.scope:
            scoped = settings.model_copy(update={"auth": settings.auth.model_copy(update={"scope": scope})})
            route_token, _ = await _one_token(scoped, for_check=True)
        else:
            route_token = token
        backend = route.upstream[0]
        timeouts = settings.upstream
        pool = Pool(
            backend.url,
            ssl_context,
            connect_timeout=timeouts.connect_timeout,
            read_timeout=timeouts.read_timeout,
            proxy=settings.network.proxy_for(backend.url),
        )
        try:
            diagnosis = await doctor.probe(pool, backend.url, route.probe_path, route_token, audience_of(scope))
        finally:
            await pool.close()
        prefix = "" if len(settings.effective_routes()) == 1 else f"{route.prefix}: "
        results.append((diagnosis.ok, prefix + diagnosis.line))
    return results


def cmd_token(args: argparse.Namespace) -> int:
    settings = _load(args)
    token, _ = _run(_one_token(settings, for_check=False))
    sys.stdout.write(token + "\n")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from sidecar_emulators.demo import run_demo
    except ModuleNotFoundError as exc:
        # The emulators are a distribution of their own (emulators/), kept out of production installs.
        missing = "" if exc.name == "sidecar_emulators" else f" (missing module: {exc.name})"
        print(f"sidecar: {DEMO_NEEDS_EMULATORS}{missing}", file=sys.stderr)
        return EXIT_CONFIG

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _run(run_demo(chunk_delay=args.chunk_delay))


def _signin_provider(settings: Settings) -> SignIn:
    from sidecar.config import UserSignInAuth
    from sidecar.tokens import build_provider

    if not isinstance(settings.auth, UserSignInAuth):
        raise ConfigError(
            [f"auth.flow: login/logout are for device_code and interactive, not {settings.auth.flow.value}"]
        )
    provider = build_provider(settings)
    assert isinstance(provider, SignIn), "every sign-in flow's provider signs people in"
    return provider


def cmd_login(args: argparse.Namespace) -> int:
    settings = _load(args)
    provider = _signin_provider(settings)

    async def login() -> int:
        try:
            user = await provider.login(browser=args.browser)
        finally:
            await provider.aclose()
        print(f"signed in as {user}; token cache saved to {provider.cache_path}", file=sys.stderr)
        return EXIT_OK

    return _run(login())


def cmd_logout(args: argparse.Namespace) -> int:
    settings = _load(args)
    provider = _signin_provider(settings)

    async def logout() -> int:
        try:
            removed = await provider.logout()
        finally:
            await provider.aclose()
        print(
            f"signed out; removed {provider.cache_path}" if removed else "no saved sign-in to remove",
            file=sys.stderr,
        )
        return EXIT_OK

    return _run(logout())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="A local proxy that adds Entra ID bearer tokens to Azure OpenAI requests.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(function=function)
        return sub

    for name, function, help_text in (
        ("serve", cmd_serve, "run the proxy"),
        ("check", cmd_check, "validate the config, get one token and print its claims (never the token)"),
        ("token", cmd_token, "print a raw access token on stdout"),
    ):
        sub = command(name, function, help_text)
        sub.add_argument(
            "--config", help="YAML config file (default: $SIDECAR_CONFIG; every key can also come from env)"
        )
        if name == "check":
            sub.add_argument(
                "--upstream",
                action="store_true",
                help="also send one request to the upstream with the token and say what its answer means",
            )
    demo = command("demo", cmd_demo, "run an offline demo against local emulators (needs the emulators distribution)")
    demo.add_argument("--chunk-delay", type=float, default=0.15, help="seconds between streamed chunks")
    login = command("login", cmd_login, "sign in as a user (device code, or --browser) and save the token cache")
    login.add_argument("--browser", action="store_true", help="sign in through the system browser (interactive)")
    logout = command("logout", cmd_logout, "remove the saved sign-in (the token cache file)")
    for sub in (login, logout):
        sub.add_argument("--config", help="YAML config file (default: $SIDECAR_CONFIG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.function(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"sidecar: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except IdentityError as exc:
        print(f"sidecar: could not get a token: {exc.one_line()}", file=sys.stderr)
        return EXIT_TOKEN
    except KeyboardInterrupt:
        return 130
