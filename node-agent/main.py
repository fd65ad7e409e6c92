"""`mlxpool agent`: parse the command line, set up logging, run the agent until signalled."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from mlxpool.agent.config import AgentConfig, RegistrationConfig
from mlxpool.agent.nodeinfo import check_node_name, default_node_name, parse_labels

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxpool agent", description="Serve a model with MLX on this machine.")
    p.add_argument("--model", required=True, type=Path, help="model directory (config.json, weights, tokenizer)")
    p.add_argument("--model-name", help="name clients use in 'model' (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8100,
                   help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--max-tokens-default", type=_positive_int, default=256,
                   help="completion tokens when a request names none (default: %(default)s)")
    p.add_argument("--max-running", type=_positive_int, default=32,
                   help="sequences decoded together in one batch (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests (default: %(default)s)")
    p.add_argument("--log-level", default=os.environ.get("MLXPOOL_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    reg = p.add_argument_group("registration (only with --kubeconfig)")
    reg.add_argument("--kubeconfig", help="register an InferenceNode in this cluster")
    reg.add_argument("--node-name", help="InferenceNode name (default: the host name)")
    reg.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="label on the InferenceNode; repeatable")
    reg.add_argument("--advertise-url", help="URL others reach this agent at (default: the bound URL)")
    reg.add_argument("--heartbeat-interval", type=float, default=5.0,
                     help="seconds between status updates (default: %(default)s)")
    return p


def parse_config(argv: list[str]) -> AgentConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 <= args.port <= 65535):
        parser.error(f"--port {args.port} is not a port number")
    model_path = args.model.expanduser().resolve()
    if not (model_path / "config.json").is_file():
        parser.error(f"--model {args.model}: not a model directory (no config.json)")
    if args.heartbeat_interval <= 0 or args.drain_timeout < 0:
        parser.error("--heartbeat-interval must be > 0 and --drain-timeout >= 0")
    registration = None
    if args.kubeconfig:
        if not Path(args.kubeconfig).is_file():
            parser.error(f"--kubeconfig {args.kubeconfig}: no such file")
        try:
            labels = parse_labels(args.label)
            node_name = check_node_name(args.node_name or default_node_name())
        except ValueError as exc:
            parser.error(str(exc))
        registration = RegistrationConfig(
            kubeconfig=args.kubeconfig, node_name=node_name, labels=labels,
            advertise_url=args.advertise_url, heartbeat_interval=args.heartbeat_interval,
        )
    elif args.label or args.node_name or args.advertise_url:
        parser.error("--node-name, --label and --advertise-url need --kubeconfig")
    return AgentConfig(
        model_path=model_path, model_name=args.model_name or model_path.name, host=args.host, port=args.port,
        max_tokens_default=args.max_tokens_default, max_running=args.max_running,
        drain_timeout=args.drain_timeout, registration=registration, log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = parse_config(args)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    from mlxpool.agent.runtime import AgentRuntime

    try:
        return asyncio.run(AgentRuntime(config).run())
    except OSError as exc:  # e.g. the port is taken
        logging.getLogger("mlxpool.agent").error("agent failed to start error=%s", exc)
        return 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
