"""`mlxpool up` / `mlxpool down`: a pool on loopback without Kubernetes.

The first look at mlxpool: N agents serving one model and a router in front of them,
on 127.0.0.1, in seconds. The router follows a static `routes.json` in the very format
the operator writes into a pool's `<pool>-routes` ConfigMap (`mlxpool.routing`), so
what is tried here is the real data path; only the control plane (placement, health
probing, table rewrites) is left out. For that, use `mlxpool dev up` (kube-apiserver
and the operator on loopback) or a real cluster.

Like `mlxpool dev up`, `up` leaves the processes running detached and records them in
`<workdir>/state.json`; `down` stops exactly those (a recycled pid is never killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from mlxpool.dev.components import start_agent, start_router
from mlxpool.dev.processes import Process, wait_for
from mlxpool.dev.stack import Member, StateFile, same_process, stop_member
from mlxpool.routing import RouteEndpoint, RoutingTable

DEFAULT_WORKDIR = Path(os.environ.get("MLXPOOL_HOME", "~/.mlxpool")).expanduser() / "local"
DEFAULT_PORT = 8080
MAX_AGENTS = 16
"""Each agent holds its own copy of the model: more than this on one machine is a mistake."""
STRATEGIES = ("round-robin", "least-loaded", "latency-aware", "prefix-affinity", "load-aware", "predicted-latency",
              "sticky-prefix")
LOCAL_POOL, LOCAL_NAMESPACE = "local", "local"
_children: dict[int, subprocess.Popen] = {}
"""Processes this interpreter started, kept so that `down` in the same process reaps
them (the usual case is a later `mlxpool down`, where init reaps them)."""


@dataclass
class LocalState(StateFile):
    workdir: str
    router_url: str
    model: str
    routes_file: str
    members: list[Member] = field(default_factory=list)


def model_problem(path: Path) -> str | None:
    """Why `path` cannot be served (None when it looks like an MLX/Hugging Face checkout)."""
    if not path.exists():
        return f"--model {path}: no such directory"
    if not path.is_dir():
        return f"--model {path}: not a directory (give the model's folder, with config.json and *.safetensors)"
    if not (path / "config.json").is_file():
        return f"--model {path}: no config.json in it (not a Hugging Face / MLX model folder)"
    if not any(path.glob("*.safetensors")):
        return f"--model {path}: no *.safetensors weights in it"
    return None


def routing_table(model_name: str, agent_urls: list[str], strategy: str) -> RoutingTable:
    """The table the router follows: every agent serves the one model, equally weighted."""
    endpoints = [RouteEndpoint(node=f"agent-{i}", url=url) for i, url in enumerate(agent_urls)]
    return RoutingTable(pool=LOCAL_POOL, namespace=LOCAL_NAMESPACE, revision=1, strategy=strategy,
                        models={model_name: endpoints}, updated=datetime.now(UTC))


def write_routes(path: Path, table: RoutingTable) -> None:
    """Atomically (the router may read it at any moment)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)


def up(model: Path, *, agents: int = 2, port: int = DEFAULT_PORT, model_name: str | None = None,
       strategy: str = "round-robin", workdir: Path = DEFAULT_WORKDIR,
       agent_args: list[str] | None = None) -> LocalState:
    """Start `agents` agents serving `model` and a router on `port`; returns once the router serves it."""
    if (old := LocalState.load(workdir)) and any(same_process(m) for m in old.members):
        raise RuntimeError(f"mlxpool is already up from {workdir} (router {old.router_url}); "
                           "run `mlxpool down` first")
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    name = model_name or model.resolve().name
    routes = workdir / "routes.json"
    routes.unlink(missing_ok=True)
    state = LocalState(str(workdir), "", name, str(routes))
    extra = ["--model-name", name, *(agent_args or [])]

    def start(i: int) -> Process:
        return _keep(start_agent(model, logs, name=f"agent-{i}", extra=extra))

    try:
        # All at once: each agent waits for its own warm-up, and the router waits for the
        # routes file, which is written once every agent is ready.
        with ThreadPoolExecutor(max_workers=agents + 1) as pool:
            router_future = pool.submit(lambda: _keep(start_router(logs, routes_file=routes, port=port)))
            futures = [pool.submit(start, i) for i in range(agents)]
            errors: list[BaseException] = []
            for fut in [*futures, router_future]:
                try:
                    state.members.append(Member.of(fut.result()))
                except Exception as exc:  # keep collecting: the started ones must be stopped
                    errors.append(exc)
                state.save()
            if errors:
                raise errors[0]
        agent_urls = [m.url for m in state.members[:agents] if m.url]
        write_routes(routes, routing_table(name, agent_urls, strategy))
        router = state.members[-1]
        state.router_url = router.url or ""
        state.save()
        wait_for(lambda: _serves(state.router_url, name), 30, f"router serving {name!r} ({router.log})")
    except BaseException:
        down(workdir)
        raise
    return state


def _keep(proc: Process) -> Process:
    _children[proc.pid] = proc.popen
    return proc


def _serves(url: str, model: str) -> bool:
    r = httpx.get(f"{url}/v1/models", timeout=2)
    return r.status_code == 200 and any(m["id"] == model for m in r.json()["data"])


def down(workdir: Path = DEFAULT_WORKDIR) -> list[str]:
    """Stop what `up` recorded, router first; returns the names stopped."""
    state = LocalState.load(workdir)
    if state is None:
        return []
    stopped = [m.name for m in reversed(state.members) if stop_member(m)]
    for member in state.members:
        if (child := _children.pop(member.pid, None)) is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
    (workdir / "state.json").unlink(missing_ok=True)
    return stopped


def examples(router_url: str, model: str) -> str:
    """Ready-to-paste client examples (a streamed chat completion)."""
    base = f"{router_url}/v1"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}],
                       "max_tokens": 32, "stream": True})
    return f"""\
curl -N {base}/chat/completions -H 'Content-Type: application/json' \\
  -d '{body}'

python - <<'EOF'   # pip install openai
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="unused")
stream = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Say hello"}}], max_tokens=32, stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
EOF"""


def _up_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxpool up", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path,
                   help="model folder (MLX / Hugging Face layout); default: a tiny random model made locally")
    p.add_argument("--model-name", help="the name clients put in 'model' (default: the folder's name)")
    p.add_argument("--agents", type=int, default=2, help=f"agents serving the model, 1..{MAX_AGENTS} (default 2)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"router port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--strategy", choices=STRATEGIES, default="round-robin", help="routing strategy")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="state, logs and routes.json (default: $MLXPOOL_HOME/local, ~/.mlxpool/local)")
    return p


def main_up(argv: list[str]) -> int:
    parser = _up_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.agents <= MAX_AGENTS:
        parser.error(f"--agents must be between 1 and {MAX_AGENTS}, not {args.agents}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}")
    model = args.model
    if model is None:
        from mlxpool.tinymodel import make_tiny

        model = args.workdir / "models" / "tiny"
        if not (model / "model.safetensors").exists():
            print(f"no --model given: making a tiny random model in {model} (it speaks gibberish)")
            make_tiny(model, "tiny")
    elif problem := model_problem(model):
        parser.error(problem)
    t0 = time.monotonic()
    print(f"starting {args.agents} agent(s) serving {model} and a router ...", flush=True)
    try:
        state = up(model, agents=args.agents, port=args.port, model_name=args.model_name,
                   strategy=args.strategy, workdir=args.workdir)
    except (RuntimeError, TimeoutError) as exc:
        print(f"mlxpool up: {exc}", file=sys.stderr)
        return 1
    print(f"\nserving model {state.model!r} at {state.router_url}/v1 "
          f"({args.agents} agent(s), {args.strategy}; up in {time.monotonic() - t0:.1f} s)\n")
    print(examples(state.router_url, state.model))
    print(f"\nroutes: {state.routes_file}   logs: {args.workdir / 'logs'}\nstop:   mlxpool down"
          + ("" if args.workdir == DEFAULT_WORKDIR else f" --workdir {args.workdir}"))
    return 0


def main_down(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlxpool down", description="stop what `mlxpool up` started, nothing else")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = p.parse_args(argv)
    stopped = down(args.workdir)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0
