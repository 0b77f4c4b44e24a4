"""Commands: serve, plan, hook-url, sign, badge-url, doctor. Argument handling only; no
decisions."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from receiver import __version__, signatures
from receiver.cli.cluster_commands import cmd_doctor, hook_url_of_receiver
from receiver.cli.common import (
    EXIT_OK,
    EXIT_PAYLOAD,
    EXIT_PROBLEMS,
    EXIT_STARTUP,
    EXIT_USAGE,
    UsageError,
    fail,
    no_kube,
    read_file,
    read_token,
)

# Every exit code, importable from the command's module (tests and scripts read them here).
__all__ = ["EXIT_OK", "EXIT_PAYLOAD", "EXIT_PROBLEMS", "EXIT_STARTUP", "EXIT_USAGE", "main",
           "parser", "sign_headers"]


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: `--manifest` is an error, not `--manifests`. Subcommands' parsers
    are of this class too (argparse makes them of the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


# -- serve -----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from receiver import logs
    from receiver.config import ConfigError
    from receiver.config_load import load_settings
    from receiver.flux.memory import ManifestError, MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.web.app import create_app, url_normaliser
    from receiver.web.drain import DrainingServer
    from receiver.web.protocols import PROTOCOLS

    try:
        settings = load_settings(
            Path(args.config) if args.config else None,
            overrides={
                "listen": {k: v for k, v in (("host", args.host), ("port", args.port)) if v},
                "manifests": args.manifests,
                "log_level": args.log_level,
                "shutdown": ({"drain_seconds": args.drain_seconds}
                             if args.drain_seconds is not None else None),
            },
        )
    except ConfigError as exc:
        return fail(str(exc))
    if args.simulate_flux and settings.manifests is None:
        return fail("--simulate-flux needs --manifests: it plays Flux on the in-memory cluster")
    if not 0 <= args.simulate_delay <= 3600:
        return fail("--simulate-delay must be between 0 and 3600 seconds")
    logs.configure(settings.log_level)
    store = ObjectStore(url_normaliser(settings))
    cluster: Any
    if settings.manifests is not None:
        try:
            cluster = MemoryCluster.from_directory(
                store, settings.manifests, secret_ttl_seconds=settings.secret_cache_seconds)
        except (ManifestError, OSError) as exc:
            return fail(f"cannot load manifests: {exc}")
    else:
        try:
            from receiver.flux.kube import KubeCluster
        except ModuleNotFoundError as exc:
            return fail(no_kube(exc))
        from receiver.flux.objects import cache_kinds

        try:
            # The chart grants the Lease in the release namespace (POD_NAMESPACE).
            cluster = KubeCluster.from_environment(
                store, settings.namespaces, secret_ttl_seconds=settings.secret_cache_seconds,
                lease_namespace=os.environ.get("POD_NAMESPACE") or None,
                **cache_kinds(settings.statuses.canaries.enabled))
        except Exception as exc:  # the client raises several types for a missing config
            return fail(f"cannot configure the Kubernetes client: {exc}")
    try:
        app = create_app(settings, cluster)
    except ConfigError as exc:
        return fail(str(exc))
    if args.simulate_flux:
        from receiver.demo.simulate import NOTICE, FluxSimulator

        assert isinstance(cluster, MemoryCluster)
        simulator = FluxSimulator(cluster, args.simulate_delay)
        app.state.parts.ingest.push_listeners.append(simulator.on_push)
        app.state.parts.notes["simulation"] = NOTICE
        logging.getLogger("receiver.demo.simulate").warning(NOTICE, extra={"simulation": True})
    config = uvicorn.Config(
        app,
        host=settings.listen.host,
        port=settings.listen.port,
        loop="uvloop",
        log_config=None,
        access_log=False,
        server_header=False,
        # After the drain: how long requests in progress may take (the chart's grace period
        # adds this to the drain and the status queue flush).
        timeout_graceful_shutdown=max(1, round(settings.shutdown.in_flight_seconds)),
        **{**settings.server.uvicorn_options(),  # connection limits and timeouts (server.*)
           # The same parser, closing a connection that stays idle from the start.
           "http": PROTOCOLS[settings.server.http]},
    )
    server = DrainingServer(config, app.state.parts.drain, settings.shutdown.drain_seconds)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        return EXIT_STARTUP
    return EXIT_OK


# -- plan ------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from receiver.config import ConfigError
    from receiver.config_load import load_settings
    from receiver.flux.memory import ManifestError, MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.metrics import Metrics
    from receiver.push.cel_filter import RequestNotJSON
    from receiver.push.cel_sandbox import FilterBudgetExceeded
    from receiver.push.package_routing import plan_selection
    from receiver.push.receiver_specs import ReceiverSpecs
    from receiver.push.resource_filter import FilterEvaluationError
    from receiver.push.selector import PayloadRefused, select_payload
    from receiver.web.app import url_normaliser

    try:
        settings = load_settings(Path(args.config) if args.config else None)
    except ConfigError as exc:
        return fail(str(exc))
    store = ObjectStore(url_normaliser(settings))
    try:
        MemoryCluster.from_directory(store, Path(args.manifests))
    except (ManifestError, OSError) as exc:
        return fail(f"cannot load manifests: {exc}")
    receivers = store.list("Receiver")
    if args.receiver:
        namespace, _, name = args.receiver.partition("/")
        receivers = [r for r in receivers if (r.namespace, r.name) == (namespace, name)]
        if not receivers:
            return fail(f"no Receiver {args.receiver} in the manifests")
    elif len(receivers) != 1:
        return fail(f"the manifests hold {len(receivers)} Receivers: name one with --receiver NS/NAME")
    try:
        raw = read_file(args.payload, "payload")
    except UsageError as exc:
        return fail(str(exc))
    # The service's own selector: the same body is read the same way by both.
    receiver = receivers[0]
    try:
        selection = select_payload(str(receiver.spec.get("type") or ""), raw)
    except PayloadRefused as exc:
        return fail(f"payload rejected ({exc.status}): {exc}", EXIT_PAYLOAD)
    specs = ReceiverSpecs(settings, store, Metrics())
    compiled, entries = specs.resource_filter(receiver), specs.entry_filters(receiver)
    if isinstance(compiled, str) or isinstance(entries, str):
        return fail(f"the Receiver's filter is invalid (the service answers 503): "
                     f"{compiled if isinstance(compiled, str) else entries}")
    plan = plan_selection(receiver, selection, store,
                          allow_cross_namespace=settings.allow_cross_namespace_refs,
                          resolved=specs.resolved(receiver),
                          gitea_prefixes=settings.gitea_prefixes())
    if compiled is not None or entries:
        # The service's filters, evaluated as it evaluates them (a worker process, budgets).
        try:
            plan = asyncio.run(_narrowed(plan, compiled, entries, "application/json", raw, store))
        except (FilterEvaluationError, FilterBudgetExceeded, RequestNotJSON) as exc:
            return fail(f"payload rejected (422): {exc}", EXIT_PAYLOAD)
    print(json.dumps(plan.as_dict(store), indent=2))
    return EXIT_OK


async def _narrowed(plan: Any, compiled: Any, entries: Any, content_type: str, body: bytes,
                    store: Any) -> Any:
    from receiver.push.cel_sandbox import FilterSandbox
    from receiver.push.resource_filter import narrow

    sandbox = FilterSandbox()
    try:
        return await narrow(plan, compiled, entries, sandbox.evaluate, content_type, body, store)
    finally:
        await sandbox.stop()


# -- hook-url, sign, badge-url ---------------------------------------------------------------


def cmd_hook_url(args: argparse.Namespace) -> int:
    if args.receiver:
        if args.name or args.namespace or args.token_file:
            return fail("--receiver reads the Receiver and its Secret: leave out --name, "
                         "--namespace and --token-file")
        return hook_url_of_receiver(args)
    if not (args.name and args.namespace and args.token_file):
        return fail("give --receiver NS/NAME, or all of --name, --namespace and --token-file")
    try:
        token = read_token(args.token_file)
    except Exception as exc:
        return fail(str(exc))
    path = "/hook/" + signatures.hook_digest(token, args.name, args.namespace)
    print((args.base_url.rstrip("/") if args.base_url else "") + path)
    return EXIT_OK


SIGN_SCHEMES = ("timestamped", "generic-hmac", "gitea", "hub", "bearer", "read")


def sign_headers(scheme: str, token: str, body: bytes, now: int, algorithm: str,
                 delivery: str = "") -> dict[str, str]:
    if scheme == "read":
        return {"X-Signature": signatures.sign_read(token, delivery, now)}
    if scheme == "timestamped":
        return {"X-Signature": signatures.sign_timestamped(token, body, now)}
    if scheme == "generic-hmac":
        return {"X-Signature": f"{algorithm}={signatures.hmac_hex(algorithm, token, body)}"}
    if scheme == "gitea":
        return {"X-Gitea-Signature": signatures.hmac_hex("sha256", token, body)}
    if scheme == "hub":
        return {"X-Hub-Signature-256": "sha256=" + signatures.hmac_hex("sha256", token, body)}
    return {"Authorization": f"Bearer {token}"}


def cmd_sign(args: argparse.Namespace) -> int:
    if (args.scheme == "read") != bool(args.delivery):
        return fail("--delivery ID goes with --scheme read, and only with it")
    if args.scheme == "read" and args.body_file:
        return fail("a read (GET /deliveries/ID) has no body")
    if {args.token_file, args.body_file} == {"-"}:
        return fail("the token and the body cannot both come from standard input")
    try:
        token = read_token(args.token_file)
        body = read_file(args.body_file, "body") if args.body_file else b""
    except Exception as exc:
        return fail(str(exc))
    headers = {"Content-Type": "application/json"} if body else {}
    headers.update(sign_headers(args.scheme, token, body, int(args.timestamp or time.time()),
                                args.algorithm, args.delivery or ""))
    for name, value in headers.items():
        print(f"-H '{name}: {value}'" if args.format == "curl" else f"{name}: {value}")
    return EXIT_OK


def cmd_badge_url(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from receiver.status.badges import mint_badge_token

    try:
        key = read_token(args.key_file, "key")
    except Exception as exc:
        return fail(str(exc))
    token = mint_badge_token(key, args.owner, args.repo, args.branch)
    query = urlencode({"branch": args.branch, "token": token})
    print(f"{args.base_url.rstrip('/')}/badge/{args.owner}/{args.repo}.svg?{query}")
    return EXIT_OK


FILE_ARG_HELP = ("file holding it; - for standard input. One trailing newline is dropped, "
                   "as the service and notify-flux drop it")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gitea-flux-bridge", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the service")
    s.add_argument("--config", help="YAML configuration file (also GFB_CONFIG)")
    s.add_argument("--manifests", help="run on an in-memory cluster loaded from this directory")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--simulate-flux", action="store_true",
                   help="with --manifests: play Flux, marking annotated objects reconciled at the "
                        "pushed commit after --simulate-delay seconds (a demo; nothing is deployed)")
    s.add_argument("--simulate-delay", type=float, default=1.0, metavar="SECONDS",
                   help="with --simulate-flux: seconds before a source fetches, and again before "
                        "its consumers apply (default 1)")
    s.add_argument("--drain-seconds", type=float,
                   help="after SIGTERM, serve this long with /readyz 503 before shutting down "
                        "(shutdown.drain_seconds)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("plan", help="print what a push would reconcile, offline")
    s.add_argument("--manifests", required=True)
    s.add_argument("--payload", required=True, help="Gitea push JSON or Actions body; - for stdin")
    s.add_argument("--receiver", help="NS/NAME, when the manifests hold several Receivers")
    s.add_argument("--config")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("hook-url", help="print a Receiver's /hook/<digest> path")
    s.add_argument("--receiver", metavar="NS/NAME",
                   help="read the Receiver and its Secret (the cluster, or --manifests) and use "
                        "the token exactly as Flux does; warns when it ends in a newline")
    s.add_argument("--manifests", help="with --receiver: read it from this directory")
    s.add_argument("--config", help="with --receiver: the bridge's configuration file")
    s.add_argument("--name")
    s.add_argument("--namespace")
    s.add_argument("--token-file", help=FILE_ARG_HELP)
    s.add_argument("--base-url", help="prefix the path with this URL")
    s.set_defaults(func=cmd_hook_url)

    s = sub.add_parser("sign", help="print the headers a curl step sends for a body")
    s.add_argument("--scheme", choices=SIGN_SCHEMES, default="timestamped")
    s.add_argument("--token-file", required=True, help=FILE_ARG_HELP)
    s.add_argument("--body-file", help="the exact bytes to send; - for stdin; none for no body")
    s.add_argument("--delivery", help="with --scheme read: the delivery id to read "
                   "(GET /deliveries/ID); a push credential never reads, nor a read one pushes")
    s.add_argument("--algorithm", choices=["sha1", "sha256", "sha512"], default="sha256")
    s.add_argument("--timestamp", type=int, help="unix time to sign (default: now)")
    s.add_argument("--format", choices=["headers", "curl"], default="headers")
    s.set_defaults(func=cmd_sign)

    s = sub.add_parser("badge-url", help="mint a signed badge URL for a private repository")
    s.add_argument("--key-file", required=True, help=FILE_ARG_HELP)
    s.add_argument("--owner", required=True)
    s.add_argument("--repo", required=True)
    s.add_argument("--branch", required=True)
    s.add_argument("--base-url", required=True)
    s.set_defaults(func=cmd_badge_url)

    s = sub.add_parser(
        "doctor", help="report what would fail silently, per Receiver and Gitea instance",
        description="Reads the cluster (or --manifests), the configuration and Gitea, and "
                    "reports what would fail without a word. Exit status: 0 no problem, 1 "
                    "problems found, 2 usage or configuration error.")
    s.add_argument("--config", help="the bridge's configuration file (also GFB_CONFIG)")
    s.add_argument("--manifests", help="read Flux objects from this directory, not a cluster "
                                       "(RBAC is then not checked)")
    s.add_argument("--base-url", help="the bridge's URL as Gitea and Flux reach it: webhooks and "
                                      "Providers must point there")
    s.add_argument("--as", dest="as_user", default="", metavar="USER",
                   help="check RBAC as this user, e.g. system:serviceaccount:NS:NAME (the "
                        "bridge's ServiceAccount; the default is whoever runs doctor)")
    s.add_argument("--namespace", help="the bridge's namespace, where its Lease lives "
                                       "(default: POD_NAMESPACE, else flux-system)")
    s.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the Flux objects to be listed (default 30)")
    s.add_argument("--output", choices=["text", "json"], default="text")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code

