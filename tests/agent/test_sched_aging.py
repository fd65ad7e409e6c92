"""The aging bound on a real agent under a sustained `critical` flood (docs/scheduling.md).

One batch slot, `aging_seconds: 0.5`: a `background` request (rank 4) must go ahead of every
request arriving more than (4 + 1) x 0.5 = 2.5 s after it, so while four clients keep the
queue full of `critical` requests it is still served, within that bound plus the time to
serve what was queued before it, and before the flood stops. Bounded: at most 15 s of flood
and 400 requests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

AGING_S = 0.5
BACKGROUND_RANK = 4
FLOOD_CLIENTS = 4
FLOOD_LIMIT_S = 15.0
FLOOD_MAX_REQUESTS = 400


def test_background_is_served_within_the_aging_bound_under_a_critical_flood(agent_factory, tiny_model: Path,
                                                                            tmp_path: Path):
    config = tmp_path / "runtime.yaml"
    config.write_text(f"""
serving: {{decode_concurrency: 1, prefill_concurrency: 1}}
priority_scheduling:
  aging_seconds: {AGING_S}
""")
    agent = agent_factory(tiny_model, ["--config", str(config)])
    stop = threading.Event()
    lock = threading.Lock()
    finished: list[float] = []  # monotonic end of each critical request
    statuses: list[int] = []

    def flood(i: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=30) as client:
            while not stop.is_set():
                with lock:
                    if len(statuses) >= FLOOD_MAX_REQUESTS:
                        return
                r = client.post("/v1/completions", json={
                    "model": "tiny", "prompt": f"flood {i}", "max_tokens": 16, "temperature": 0,
                    "priority": "critical"})
                with lock:
                    statuses.append(r.status_code)
                    finished.append(time.monotonic())

    def waiting(client: httpx.Client) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('vllm:num_requests_waiting{model_name="tiny"}'):
                return float(line.split()[-1])
        return 0.0

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(FLOOD_CLIENTS)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=agent.url, timeout=FLOOD_LIMIT_S + 10) as client:
            deadline = time.monotonic() + 10
            while waiting(client) < 2:  # the flood has the slot and a queue behind it
                assert time.monotonic() < deadline, "the flood never queued"
                time.sleep(0.01)
            started = time.monotonic()
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "patient", "max_tokens": 4,
                                                     "temperature": 0, "priority": "background"})
            served = time.monotonic()
    finally:
        # Keep flooding a little longer: it must still be on when the background request ends.
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
    assert r.status_code == 200, r.text
    wait = served - started
    with lock:
        after = sum(1 for end in finished if end > served)
        during = sum(1 for end in finished if started < end <= served)
        codes = set(statuses)
    assert codes == {200}, codes
    assert during >= 1, "no critical request was served while it waited: no flood to age through"
    assert after >= 1, "the flood had stopped before the background request was served"
    # (rank + 1) x aging_seconds, plus serving what was queued before it: at most the four
    # flood requests then waiting or running (16 tokens each on the tiny model), with room
    # for a loaded 2-core machine.
    bound = (BACKGROUND_RANK + 1) * AGING_S
    print(f"aging: background waited {wait:.2f} s, {during} critical served meanwhile, {after} after")
    assert wait <= bound + 3.0, (f"background waited {wait:.2f} s under the flood (bound {bound} s + drain), "
                                 f"{during} critical requests served meanwhile")
