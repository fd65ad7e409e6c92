"""`mlxpool router`: parse the command line, build the app, serve it with uvicorn.

Logs `router ready url=http://HOST:PORT` once listening (with the real port when
`--port 0`), the line harnesses wait for.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from pathlib import Path

import uvicorn

from mlxpool.httpguards import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, SizeLimits
from mlxpool.router.app import create_app, shedding_policy
from mlxpool.router.settings import (
    PoolRef,
    RouterSettings,
    SharingSettings,
    SheddingSettings,
    SignalSettings,
    StalePolicy,
    TableSourceSettings,
    UpstreamSettings,
)

log = logging.getLogger("mlxpool.router")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxpool router",
        description="Serve the OpenAI API of one InferencePool, forwarding to the agents its routing table lists.")
    source = parser.add_argument_group("routing table (one of)")
    source.add_argument("--pool", type=_pool_ref, metavar="NAMESPACE/NAME",
                        help="follow the pool's ConfigMap NAME-routes through the API server")
    source.add_argument("--kubeconfig", type=Path, help="kubeconfig (default: in-cluster, then ~/.kube/config)")
    source.add_argument("--routes-file", type=Path, metavar="PATH",
                        help="follow a routes.json file instead (re-read when it changes)")
    serve = parser.add_argument_group("serving")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument("--reuse-port", action="store_true",
                       help="share the port with a router already on it (SO_REUSEPORT): start the new one, "
                            "then stop the old, and no request is refused; it listens once its table is loaded")
    serve.add_argument("--first-table-wait", type=float, default=None, metavar="SECONDS",
                       help="wait this long for the first routing table before listening "
                            "(default: 0, or 10 with --reuse-port)")
    serve.add_argument("--strategies", type=Path, metavar="YAML",
                       help="strategy profiles added to or replacing the built-in ones")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
                       help="largest request body accepted (larger: 413; as the agent's limits.max_body_bytes)")
    serve.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES, metavar="BYTES",
                       help="largest total of request header names and values (larger: 431)")
    upstream = parser.add_argument_group("upstream (agents)")
    defaults = UpstreamSettings()
    upstream.add_argument("--max-attempts", type=int, default=defaults.max_attempts,
                          help="endpoints tried per request, failovers included")
    upstream.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout, metavar="SECONDS")
    upstream.add_argument("--first-byte-timeout", type=float, default=defaults.first_byte_timeout, metavar="SECONDS")
    upstream.add_argument("--read-timeout", type=float, default=defaults.read_timeout, metavar="SECONDS",
                          help="silence tolerated between two chunks of a streaming answer")
    upstream.add_argument("--upstream-ca-file", type=Path, metavar="PEM",
                          help="CA bundle to verify agents' HTTPS certificates with (https:// endpoints); "
                               "default: the system's trust store")
    upstream.add_argument("--breaker-failures", type=int, default=defaults.breaker_failures, metavar="N",
                          help="timeouts, 5xx or broken connections in a row that open an endpoint's circuit "
                               "breaker (a refused connection opens it at once)")
    upstream.add_argument("--breaker-open-seconds", type=float, default=defaults.breaker_open_seconds,
                          metavar="SECONDS", help="how long an open breaker keeps requests away before one probe")
    shedding = parser.add_argument_group(
        "priority shedding (429 when every endpoint's slot usage, running + waiting over slots, reaches the tier's "
        "threshold; 'off' never sheds that tier; critical is never shed)")
    shed = SheddingSettings()
    for tier in ("background", "low", "normal", "high"):
        shedding.add_argument(f"--shed-{tier}", type=_threshold, default=getattr(shed, tier), metavar="USAGE|off",
                              help=f"default: {getattr(shed, tier) if getattr(shed, tier) is not None else 'off'}")
    shedding.add_argument("--shed-mean-output-tokens", type=int, default=shed.mean_output_tokens, metavar="TOKENS",
                          help="decode steps a waiting request holds a slot for, in the Retry-After estimate")
    signals = parser.add_argument_group("agents' load signals (GET /v1/signals)")
    sig = SignalSettings()
    signals.add_argument("--signals-interval", type=float, default=sig.interval, metavar="SECONDS",
                         help="poll every endpoint this often; 0 turns polling off")
    signals.add_argument("--signals-max-age", type=float, default=sig.max_age, metavar="SECONDS",
                         help="older reports are stale")
    signals.add_argument("--signals-stale", choices=[p.value for p in StalePolicy], default=sig.stale_policy.value,
                         help="a stale endpoint counts as saturated, or is scored on local counts (fallback)")
    share = parser.add_argument_group("prefix index shared by router replicas (Redis)")
    shr = SharingSettings()
    share.add_argument("--prefix-redis", metavar="URL", default=None,
                       help="redis://host:port/db: share prefix-affinity indexes with the pool's other replicas")
    share.add_argument("--prefix-redis-key", metavar="KEY", default=shr.key,
                       help="the Redis stream of this pool's replicas (one per pool)")
    return parser


def _pool_ref(text: str) -> PoolRef:
    try:
        return PoolRef.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _threshold(text: str) -> float | None:
    if text.lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a slot usage (e.g. 1.5) or 'off', got {text!r}") from None
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"a shedding threshold must be in (0, 1000], got {text}")
    return value


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RouterSettings:
    if args.routes_file is None and args.pool is None:
        parser.error("give --pool NAMESPACE/NAME (with --kubeconfig) or --routes-file PATH")
    if args.routes_file is not None and args.kubeconfig is not None:
        parser.error("--routes-file and --kubeconfig exclude each other")
    if args.kubeconfig is not None and not args.kubeconfig.is_file():
        parser.error(f"--kubeconfig {args.kubeconfig}: no such file")
    if args.reuse_port and args.port == 0:
        parser.error("--reuse-port needs a --port (0 would pick a port nobody else holds)")
    if args.first_table_wait is not None and not 0 <= args.first_table_wait <= 300:
        parser.error("--first-table-wait must be between 0 and 300 seconds")
    if args.upstream_ca_file is not None and not args.upstream_ca_file.is_file():
        parser.error(f"--upstream-ca-file {args.upstream_ca_file}: no such file")
    if args.strategies is not None and not args.strategies.is_file():
        parser.error(f"--strategies {args.strategies}: no such file")
    try:
        settings = RouterSettings(
            tables=TableSourceSettings(pool=args.pool, kubeconfig=args.kubeconfig, routes_file=args.routes_file),
            upstream=UpstreamSettings(max_attempts=args.max_attempts, connect_timeout=args.connect_timeout,
                                      first_byte_timeout=args.first_byte_timeout, read_timeout=args.read_timeout,
                                      breaker_failures=args.breaker_failures,
                                      breaker_open_seconds=args.breaker_open_seconds,
                                      ca_file=args.upstream_ca_file),
            shedding=SheddingSettings(background=args.shed_background, low=args.shed_low, normal=args.shed_normal,
                                      high=args.shed_high, mean_output_tokens=args.shed_mean_output_tokens),
            signals=SignalSettings(interval=args.signals_interval, max_age=args.signals_max_age,
                                   stale_policy=StalePolicy(args.signals_stale)),
            sharing=SharingSettings(redis_url=args.prefix_redis, key=args.prefix_redis_key),
            strategies_file=args.strategies,
            limits=SizeLimits(max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes),
            first_table_wait=args.first_table_wait if args.first_table_wait is not None
            else (10.0 if args.reuse_port else 0.0),
        )
        shedding_policy(settings.shedding)  # tier order and critical checked now, named by flag
    except ValueError as exc:
        parser.error(str(exc).replace("shedding: ", "--shed-*: "))
    return settings


class _Server(uvicorn.Server):
    """uvicorn's server, announcing the bound address once it listens."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info("router ready url=http://%s:%d", host, port)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every forwarded request at INFO
    try:
        app = create_app(settings)
    except ValueError as exc:  # a bad strategies file
        parser.error(str(exc))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            h11_max_incomplete_event_size=settings.limits.max_header_bytes)  # where h11 parses
    server = _Server(config)
    # With --reuse-port the socket is bound now and listens only after the lifespan (the
    # first table) started: until listen() the kernel sends the port's connections elsewhere.
    sockets = [_reuse_port_socket(args.host, args.port)] if args.reuse_port else None
    # uvicorn's own loop choice (uvloop when installed): `asyncio.run` alone would run the
    # router on the default selector loop, whose transports cost ~20% of its CPU under load.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(server.serve(sockets))
    return 0 if server.started else 1
