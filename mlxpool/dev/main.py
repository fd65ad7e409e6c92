"""`mlxpool dev up|down|status`: the local stack on loopback (see `stack`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlxpool.dev import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxpool dev", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=stack.DEFAULT_WORKDIR,
                        help="where state, logs and kubeconfigs live (default: .mlxpool/dev)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start control plane, operator, agents and router")
    p_up.add_argument("--agents", type=int, default=2, help="number of agents (default 2)")
    p_up.add_argument("--pool", default=stack.DEFAULT_POOL, help="NAMESPACE/NAME the router serves")
    sub.add_parser("down", help="stop everything `up` started, and nothing else")
    sub.add_parser("status", help="show what runs where")
    args = parser.parse_args(argv)

    if args.command == "up":
        if args.agents < 0:
            parser.error("--agents must be >= 0")
        state = stack.up(args.workdir, args.agents, args.pool)
        _print_status(args.workdir)
        print(next_steps(state, args.pool, args.workdir))
        return 0
    if args.command == "down":
        stopped = stack.down(args.workdir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    return 0 if _print_status(args.workdir) else 1


def next_steps(state: stack.StackState, pool: str, workdir: Path) -> str:
    """What to type next: a pool from the samples, then a streamed completion through the router."""
    namespace, _, name = pool.partition("/")
    router = next((m.url for m in state.members if m.name == "router"), "http://127.0.0.1:PORT")
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16,
                       "stream": True})
    down = "mlxpool dev down" + ("" if workdir == stack.DEFAULT_WORKDIR else f" --workdir {workdir}")
    return f"""
export KUBECONFIG={state.kubeconfig}
kubectl apply -k {stack.samples_overlay(workdir)}   # manifests/samples, the ModelCache staged from this stack's model
kubectl wait --for=condition=Ready -n {namespace} inferencepool/{name} modelcache/tiny --timeout=90s
mlxpool status
curl -N {router}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'
{down}"""


def _print_status(workdir: Path) -> bool:
    rows = stack.status(workdir)
    if not rows:
        print(f"no dev stack recorded in {workdir}")
        return False
    print(f"{'NAME':<16}{'PID':>8}  {'STATE':<9}{'URL':<30}LOG")
    for r in rows:
        print(f"{r['name']:<16}{r['pid']:>8}  {'running' if r['running'] else 'stopped':<9}"
              f"{r['url'] or '-':<30}{_shown(r['log'])}")
    return all(r["running"] for r in rows)


def _shown(path: str) -> str:
    """Relative to here when under it, else absolute (no `../../../tmp/...`)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


if __name__ == "__main__":
    sys.exit(main())
