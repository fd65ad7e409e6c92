"""`make demo`: the whole system end to end on one machine.

Brings the dev stack up, applies manifests/samples with kubectl, waits for the sample
pool to be Ready, shows the pool and the fleet, asks the router for a completion (plain
and streamed), then tears everything down unless KEEP=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import httpx

from mlxpool.dev import stack
from mlxpool.dev.controlplane import binaries_dir
from mlxpool.dev.controlplane import kubectl as run_kubectl

POOL_NAMESPACE, POOL_NAME, MODEL = "default", "tiny", "tiny"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    keep = os.environ.get("KEEP") == "1"
    workdir = stack.DEFAULT_WORKDIR
    stack.down(workdir)  # a stale stack from an interrupted demo
    t0 = time.monotonic()
    step("starting the local control plane, operator, 2 agents and a router")
    state = stack.up(workdir, agents=2, pool=f"{POOL_NAMESPACE}/{POOL_NAME}")
    try:
        bin_dir = binaries_dir()

        def kubectl(*args: str) -> str:
            return run_kubectl(state.kubeconfig, *args, bin_dir=bin_dir).stdout

        # The samples as they are, but for the ModelCache's source: staged from this stack's model.
        step(f"kubectl apply -k manifests/samples (through {stack.samples_overlay(workdir)})")
        print(kubectl("apply", "-k", str(stack.samples_overlay(workdir))), end="")
        step(f"waiting for inferencepool/{POOL_NAME} and modelcache/{MODEL} to be Ready")
        print(kubectl("wait", "--for=condition=Ready", f"inferencepool/{POOL_NAME}", f"modelcache/{MODEL}",
                      "-n", POOL_NAMESPACE, "--timeout=90s"), end="")
        step("kubectl get inferencepools,inferencenodes")
        print(kubectl("get", "inferencepools", "-A", "-o", "wide"), end="")
        print(kubectl("get", "inferencenodes", "-o", "wide"), end="")
        print(kubectl("get", "modelcaches", "-A"), end="")
        step("routing table (ConfigMap tiny-routes)")
        print(kubectl("get", "configmap", f"{POOL_NAME}-routes", "-n", POOL_NAMESPACE,
                      "-o", "jsonpath={.data.routes\\.json}"))
        router = next(m.url for m in state.members if m.name == "router")
        step(f"POST {router}/v1/completions through the router")
        body = {"model": MODEL, "prompt": "Hello, world!", "max_tokens": 16, "temperature": 0}
        resp = _post_with_retry(f"{router}/v1/completions", body)
        print(json.dumps(resp, indent=2))
        step("the same, streamed (SSE)")
        with httpx.stream("POST", f"{router}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, "stream": True,
        }) as r:
            r.raise_for_status()
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        print(f"{len(chunks)} SSE events, last: {chunks[-1]}")
        step(f"demo succeeded in {time.monotonic() - t0:.1f}s")
    except BaseException:
        _print_logs(state)
        raise
    finally:
        if keep:
            print(f"\nKEEP=1: the stack stays up. export KUBECONFIG={state.kubeconfig}; "
                  "`.venv/bin/mlxpool dev status`; `make dev-down` to stop it.")
        else:
            step("tearing down: " + ", ".join(stack.down(workdir)))
    return 0


def _post_with_retry(url: str, body: dict, attempts: int = 20) -> dict:
    """The router may still be reading its first table right after the pool turns Ready."""
    for i in range(attempts):
        r = httpx.post(url, json=body, timeout=60)
        if r.status_code not in (404, 503) or i == attempts - 1:
            r.raise_for_status()
            return r.json()
        time.sleep(0.5)
    raise AssertionError("unreachable")


def _print_logs(state: stack.StackState) -> None:
    for m in state.members:
        print(f"\n--- {m.name} ({m.log}) ---", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            tail = Path(m.log).read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
