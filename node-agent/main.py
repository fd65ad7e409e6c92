"""`mlxpool agent`: parse the command line, set up logging, run the agent until signalled.

Settings come from the command line, the environment and the runtime file
(`--config`, see `config.py`); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from mlxpool.agent.config import RuntimeConfig, load_runtime_config
from mlxpool.agent.http.auth import API_KEY_ENV, OPS_TOKEN_ENV, Credentials
from mlxpool.agent.node.nodeinfo import check_node_name, default_node_name, parse_labels
from mlxpool.agent.runtime import AgentConfig, AgentRuntime, RegistrationConfig
from mlxpool.resources import NODE_LEASE_NAMESPACE

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
CONFIG_ENV = "MLXPOOL_CONFIG"
PTX_CACHE_ENV = "MLX_PTX_CACHE_DIR"
"""Where MLX's CUDA backend keeps the kernels it compiled (read when it first compiles)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxpool agent", description="Serve a model with MLX on this machine.")
    p.add_argument("--model", type=Path,
                   help="model directory (config.json, weights, tokenizer) to serve from the start; without it the "
                        "agent starts empty and loads what the operations API tells it to")
    p.add_argument("--model-name", help="name clients use in 'model' (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8100,
                   help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests (default: %(default)s)")
    p.add_argument("--log-level", default=os.environ.get("MLXPOOL_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--config", type=Path, default=os.environ.get(CONFIG_ENV) or None,
                   help=f"runtime file (see config/runtime.yaml; default: ${CONFIG_ENV}, else built-in defaults)")
    # Flags below override the runtime file's keys named in their help (None: not given).
    serving = p.add_argument_group("serving (override the runtime file's `serving` section)")
    serving.add_argument("--max-tokens-default", type=_positive_int,
                         help="serving.max_tokens_default: completion tokens when a request names none")
    serving.add_argument("--decode-concurrency", "--max-running", dest="decode_concurrency", type=_positive_int,
                         help="serving.decode_concurrency: sequences decoded together in one batch")
    serving.add_argument("--prefill-concurrency", type=_positive_int,
                         help="serving.prefill_concurrency: prompts prefilled together")
    serving.add_argument("--prefill-step-size", type=_positive_int,
                         help="serving.prefill_step_size: prompt tokens per prefill chunk")
    serving.add_argument("--prefill-token-budget", type=_positive_int,
                         help="serving.prefill_token_budget: prompt tokens admitted for prefill at once")
    serving.add_argument("--prompt-cache-bytes", type=_non_negative_int,
                         help="serving.prompt_cache_bytes: byte cap of the prefix cache (0 disables it)")
    serving.add_argument("--no-warmup", dest="warmup", action="store_const", const=False,
                         help="serving.warmup=false: report ready without a warm-up generation")
    serving.add_argument("--stream-interval-ms", type=float,
                         help="serving.stream_interval_ms: write a stream's tokens at most this often (0: each token)")
    auth = p.add_argument_group("auth (override the runtime file's `auth` section)")
    auth.add_argument("--api-key-file", type=Path,
                      help="auth.api_key_file: API keys for the inference endpoints, one per line "
                           f"(else ${API_KEY_ENV}; none: open)")
    auth.add_argument("--ops-token-file", type=Path,
                      help=f"auth.ops_token_file: bearer token of the operations API (else ${OPS_TOKEN_ENV}; "
                           "none: that API answers 403)")
    auth.add_argument("--tls-cert-file", type=Path,
                      help="auth.tls_cert_file: serve HTTPS with this PEM certificate (with --tls-key-file)")
    auth.add_argument("--tls-key-file", type=Path, help="auth.tls_key_file: the certificate's PEM private key")
    ops = p.add_argument_group("operations API (override the runtime file's `weight_management` section)")
    ops.add_argument("--cache-dir", type=Path,
                     help="weight_management.cache_dir: where staged models live (default ~/.cache/mlxpool/models)")
    reg = p.add_argument_group("registration (only with --kubeconfig)")
    reg.add_argument("--kubeconfig", help="register an InferenceNode in this cluster")
    reg.add_argument("--node-name", help="InferenceNode name (default: the host name)")
    reg.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="label on the InferenceNode; repeatable")
    reg.add_argument("--advertise-url", help="URL others reach this agent at (default: the bound URL)")
    reg.add_argument("--heartbeat-interval", type=float, default=10.0,
                     help="seconds between renewals of the node's Lease; the status is written when it changes "
                          "(default: %(default)s)")
    reg.add_argument("--lease-namespace", default=NODE_LEASE_NAMESPACE,
                     help="namespace of the node's Lease (default: %(default)s)")
    return p


def parse_config(argv: list[str]) -> AgentConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0 <= args.port <= 65535):
        parser.error(f"--port {args.port} is not a port number")
    model_path = args.model.expanduser().resolve() if args.model is not None else None
    if model_path is not None and not (model_path / "config.json").is_file():
        parser.error(f"--model {args.model}: not a model directory (no config.json)")
    if model_path is None and args.model_name:
        parser.error("--model-name needs --model")
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
            lease_namespace=args.lease_namespace,
        )
    elif args.label or args.node_name or args.advertise_url:
        parser.error("--node-name, --label and --advertise-url need --kubeconfig")
    try:
        runtime = _runtime_config(args)
        credentials = Credentials.load(runtime.auth.api_key_file, runtime.auth.ops_token_file)
    except ValueError as exc:  # ConfigError included
        parser.error(str(exc))
    return AgentConfig(
        model_path=model_path, model_name=args.model_name or (model_path.name if model_path else None),
        host=args.host, port=args.port,
        drain_timeout=args.drain_timeout, registration=registration, log_level=args.log_level, runtime=runtime,
        credentials=credentials,
    )


def _runtime_config(args: argparse.Namespace) -> RuntimeConfig:
    """The runtime file + environment, then the flags given on the command line."""
    runtime = load_runtime_config(args.config)
    runtime = runtime.with_overrides(
        "serving", max_tokens_default=args.max_tokens_default, decode_concurrency=args.decode_concurrency,
        prefill_concurrency=args.prefill_concurrency, prefill_step_size=args.prefill_step_size,
        prefill_token_budget=args.prefill_token_budget,
        prompt_cache_bytes=args.prompt_cache_bytes, warmup=args.warmup, stream_interval_ms=args.stream_interval_ms,
    )
    runtime = runtime.with_overrides("weight_management", cache_dir=args.cache_dir)
    return runtime.with_overrides("auth", api_key_file=args.api_key_file, ops_token_file=args.ops_token_file,
                                  tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file)


def main(argv: list[str] | None = None, exit_process: bool = True) -> int:
    """Run the agent; with `exit_process` (the command line) the process ends here (`exit_now`)."""
    args = sys.argv[1:] if argv is None else argv
    config = parse_config(args)
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    from uvicorn.loops.auto import auto_loop_factory  # uvloop when it is installed

    compile_cache = use_compile_cache(config.runtime.serving.compile_cache_dir)
    if compile_cache is not None:
        logging.getLogger("mlxpool.agent").info("compile cache dir=%s", compile_cache)
    try:
        with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
            code = runner.run(AgentRuntime(config).run())
    except OSError as exc:  # e.g. the port is taken
        logging.getLogger("mlxpool.agent").error("agent failed to start error=%s", exc)
        code = 1
    if exit_process:
        exit_now(code)
    return code


def use_compile_cache(directory: Path | None) -> Path | None:
    """Point MLX's CUDA kernel cache at `directory` (unless the environment already names one),
    so a restarted agent finds its kernels compiled. Must run before MLX first compiles."""
    if directory is None:
        return None
    directory = directory.expanduser()
    current = os.environ.get(PTX_CACHE_ENV)
    if current:
        return Path(current)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[PTX_CACHE_ENV] = str(directory)
    return directory


def exit_now(code: int) -> NoReturn:
    """Leave without running C++ static destructors: the agent has stopped everything (engine
    threads joined, the device synchronized, logs flushed). MLX's CUDA backend tears down its
    device objects after Python's finalization and aborts there ("terminate called without an
    active exception"), turning a clean exit 0 into SIGABRT; nothing is left to clean up."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


if __name__ == "__main__":
    main()
