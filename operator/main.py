"""`mlxpool operator`: parse the command line and run kopf with our handlers.

Standalone (no peering, one replica with `strategy: Recreate`) unless given a shard:
`--shard NAME` (with `--pool-selector` and/or `--namespace` saying which pools are the
shard's) peers the shard's replicas through kopf's peering object `mlxpool-NAME`, so one
of them works and the others wait (docs/fleet-scale.md, manifests/sharding).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import ssl
from pathlib import Path

from mlxpool.operator.config import OperatorConfig
from mlxpool.operator.io.transports import agent_tls
from mlxpool.operator.logic.shards import parse_selector

LOG_FORMATS = ("plain", "full", "json")
TOKEN_ENV = "MLXPOOL_AGENT_TOKEN"


def parse_args(argv: list[str]) -> tuple[OperatorConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="mlxpool operator",
        description="Reconcile InferencePools: place them on InferenceNodes, probe the agents, "
                    "write routing tables and status.",
    )
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", dest="namespaces", metavar="NS",
                       help="reconcile pools in this namespace (repeatable; globs allowed)")
    scope.add_argument("--all-namespaces", "-A", action="store_true",
                       help="reconcile pools in every namespace (default)")
    parser.add_argument("--pool-selector", metavar="SELECTOR",
                        help="this replica's shard: reconcile only pools (and ModelCaches) whose labels match, "
                             "e.g. mlxpool.dev/shard=a (filtered by the API server)")
    parser.add_argument("--shard", metavar="NAME", type=_shard_name,
                        help="the shard's name: its replicas peer through kopf's peering object mlxpool-NAME "
                             "(one works, the others wait); without it the operator runs standalone")
    parser.add_argument("--priority", type=int, default=OperatorConfig.priority, metavar="N",
                        help="peering priority within the shard: the highest replica works (default: %(default)s)")
    parser.add_argument("--no-node-conditions", dest="node_conditions", action="store_false",
                        help="do not write InferenceNodes' Ready condition (another shard does)")
    parser.add_argument("--probe-interval", type=_positive, metavar="S",
                        help="probe every S seconds, overriding each pool's spec.healthCheck.intervalSeconds")
    parser.add_argument("--probe-timeout", type=_positive, default=OperatorConfig.probe_timeout, metavar="S",
                        help="seconds an agent has to answer GET /health (default: %(default)s)")
    parser.add_argument("--probes-per-second", type=_positive, default=OperatorConfig.probes_per_second, metavar="N",
                        help="periodic probes of watched agents, for the whole fleet (default: %(default)s)")
    parser.add_argument("--max-probes-in-flight", type=_count, default=OperatorConfig.max_probes_in_flight,
                        metavar="N", help="probes outstanding at once (default: %(default)s)")
    parser.add_argument("--watch-interval", type=_non_negative, default=OperatorConfig.watch_interval, metavar="S",
                        help="seconds between lines of an agent's health watch, e.g. 10; 0: no watches, probe "
                             "every agent every interval (default: %(default)s)")
    parser.add_argument("--reports-per-second", type=_positive, default=OperatorConfig.reports_per_second,
                        metavar="N", help="periodic GET /v1/node reports, for the whole fleet (default: %(default)s)")
    parser.add_argument("--node-stale-seconds", type=_positive, default=OperatorConfig.node_stale_after, metavar="S",
                        help="route no more to nodes whose heartbeat is older (default: %(default)s)")
    parser.add_argument("--lease-namespace", default=OperatorConfig.lease_namespace, metavar="NS",
                        help="namespace of the agents' node Leases (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help="serve Prometheus /metrics on this port (0: a free one, logged in the ready line)")
    parser.add_argument("--metrics-address", default=OperatorConfig.metrics_address, metavar="ADDR",
                        help="address of the metrics endpoint (default: %(default)s)")
    parser.add_argument("--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    parser.add_argument("--agent-token-file", type=Path, metavar="PATH",
                        help=f"bearer token for the agents' operations API (default: ${TOKEN_ENV})")
    parser.add_argument("--agent-ca-file", type=Path, metavar="PEM",
                        help="CA bundle to verify agents' HTTPS certificates with (https:// agents); "
                             "default: the system's trust store")
    parser.add_argument("--agent-timeout", type=_positive, default=OperatorConfig.agent_timeout, metavar="S",
                        help="seconds an agent has to answer an operations call (default: %(default)s)")
    parser.add_argument("--report-interval", type=_positive, default=OperatorConfig.report_interval, metavar="S",
                        help="seconds between GET /v1/node of each agent (default: %(default)s)")
    parser.add_argument("--scrape-interval", type=_positive, default=OperatorConfig.scrape_interval, metavar="S",
                        help="seconds between scrapes of placed agents' /metrics (default: %(default)s)")
    parser.add_argument("--load-retry-seconds", type=_positive, default=OperatorConfig.load_retry_after, metavar="S",
                        help="seconds before a failed load is tried again on that node (default: %(default)s)")
    parser.add_argument("--resync-interval", type=_positive, default=OperatorConfig.resync_interval, metavar="S",
                        help="seconds between passes of an object nothing woke (default: %(default)s)")
    parser.add_argument("--orphan-grace-seconds", type=_positive, default=OperatorConfig.orphan_grace, metavar="S",
                        help="unload a model this operator loaded once no pool has claimed it for S seconds "
                             "(default: %(default)s)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="full")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.pool_selector is not None:
        try:
            parse_selector(args.pool_selector)
        except ValueError as exc:
            parser.error(f"--pool-selector: {exc}")
    config = OperatorConfig(
        kubeconfig=args.kubeconfig,
        namespaces=tuple(args.namespaces or ()),
        pool_selector=args.pool_selector.strip() if args.pool_selector is not None else None,
        shard=args.shard,
        priority=args.priority,
        node_conditions=args.node_conditions,
        probe_interval=args.probe_interval,
        probe_timeout=args.probe_timeout,
        node_stale_after=args.node_stale_seconds,
        probes_per_second=args.probes_per_second,
        max_probes_in_flight=args.max_probes_in_flight,
        watch_interval=args.watch_interval,
        reports_per_second=args.reports_per_second,
        lease_namespace=args.lease_namespace,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        liveness_endpoint=args.liveness,
        agent_token=_agent_token(parser, args.agent_token_file),
        agent_ca_file=_agent_ca_file(parser, args.agent_ca_file),
        agent_timeout=args.agent_timeout,
        report_interval=args.report_interval,
        scrape_interval=args.scrape_interval,
        load_retry_after=args.load_retry_seconds,
        resync_interval=args.resync_interval,
        orphan_grace=args.orphan_grace_seconds,
    )
    return config, args


def _agent_token(parser: argparse.ArgumentParser, path: Path | None) -> str | None:
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        parser.error(f"--agent-token-file {path}: {exc.strerror}")
    if not token:
        parser.error(f"--agent-token-file {path}: the file is empty")
    return token


def _agent_ca_file(parser: argparse.ArgumentParser, path: Path | None) -> Path | None:
    """Refused at the start if it is not a CA bundle: a probe would fail on every agent."""
    if path is not None:
        try:
            agent_tls(path)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"--agent-ca-file {path}: {exc}")
    return path


def _shard_name(text: str) -> str:
    """A shard name goes into a peering object's name: a DNS label, short enough for the prefix."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: lowercase letters, digits and '-', at most 42, "
                                         "starting and ending with a letter or digit")
    return text


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def main(argv: list[str]) -> int:
    config, args = parse_args(argv)
    if config.kubeconfig is not None:
        # kopf logs in through kubernetes_asyncio's default loader (which handles exec
        # plugins too), and that reads $KUBECONFIG when imported: set it before importing.
        os.environ["KUBECONFIG"] = str(config.kubeconfig.resolve())

    import kopf

    from mlxpool.operator import handlers  # importing it registers the handlers

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe otherwise
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per liveness probe
    if not args.verbose:
        # kopf logs "Handler ... succeeded" for every watch event (node heartbeats included).
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        standalone=config.shard is None,
        peering_name=config.peering_name,
        priority=config.priority,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
        memo=handlers.operator_memo(config),
    )
    return 0
