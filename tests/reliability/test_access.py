"""Access: the API keys and the ops token rotate without a restart (reloaded from their
files by a real agent process), a broken rotation keeps the previous secrets, and no
secret — current, old, or wrongly presented — appears in an error body or the logs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from mlxpool.dev import components

pytestmark = pytest.mark.integration

OLD_KEY, NEW_KEY = "sk-old-0f3c9a1b2d", "sk-new-7e6d5c4b3a"
OLD_OPS, NEW_OPS = "ops-old-a1b2c3d4e5", "ops-new-f6e5d4c3b2"
WRONG = "sk-wrong-presented-9z8y7x"


def rotate(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)  # as Kubernetes secret volumes and most tools rotate: an atomic rename


def wait_status(url: str, headers: dict[str, str], status: int, timeout: float = 10.0, ops: bool = False) -> float:
    start = time.monotonic()
    path = "/v1/node" if ops else "/v1/models"
    while (got := httpx.get(url + path, headers=headers, timeout=5).status_code) != status:
        assert time.monotonic() - start < timeout, f"{path} still answers {got}, expected {status}"
        time.sleep(0.05)
    return time.monotonic() - start


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_secrets_rotate_without_a_restart_and_never_leak(tiny_model, tmp_path):
    keys, ops = tmp_path / "api-keys", tmp_path / "ops-token"
    keys.write_text(OLD_KEY + "\n")
    ops.write_text(OLD_OPS + "\n")
    logs = tmp_path / "logs"
    agent = components.start_agent(tiny_model, logs, ops_token_file=ops, extra=["--api-key-file", str(keys)])
    bodies: list[str] = []
    try:
        pid = agent.pid
        assert httpx.get(agent.url + "/v1/models", headers=bearer(OLD_KEY)).status_code == 200
        wrong = httpx.get(agent.url + "/v1/models", headers=bearer(WRONG))
        assert wrong.status_code == 401
        bodies.append(wrong.text)

        # Rotation with an overlap (old and new keys both valid), then the old one dropped.
        rotate(keys, f"{OLD_KEY}\n{NEW_KEY}\n")
        took = wait_status(agent.url, bearer(NEW_KEY), 200)
        assert httpx.get(agent.url + "/v1/models", headers=bearer(OLD_KEY)).status_code == 200
        rotate(keys, NEW_KEY + "\n")
        wait_status(agent.url, bearer(OLD_KEY), 401)
        rotate(ops, NEW_OPS + "\n")
        wait_status(agent.url, bearer(NEW_OPS), 200, ops=True)
        refused = httpx.get(agent.url + "/v1/node", headers=bearer(OLD_OPS))
        assert refused.status_code == 401
        bodies.append(refused.text)

        # A broken rotation (an empty file) keeps the previous secrets: neither opened nor locked.
        rotate(keys, "\n")
        time.sleep(2.5)
        assert httpx.get(agent.url + "/v1/models", headers=bearer(NEW_KEY)).status_code == 200
        assert httpx.get(agent.url + "/v1/models").status_code == 401
        assert agent.pid == pid and agent.popen.poll() is None, "rotation must not restart the agent"
        print(f"rotation applied after {took:.2f}s")
    finally:
        agent.stop(10)
    produced = "\n".join(bodies) + "".join(p.read_text(errors="replace") for p in logs.rglob("*.log"))
    assert "secrets reloaded" in produced
    assert "cannot be used; keeping the previous secrets" in produced
    for secret in (OLD_KEY, NEW_KEY, OLD_OPS, NEW_OPS, WRONG):
        assert secret not in produced, f"a secret leaked into the logs or an error body: {secret}"
