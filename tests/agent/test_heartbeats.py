"""Which beats write the InferenceNode's status (a pure rule of the registrar), and the
node Lease shapes agents write and the operator reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from mlxpool.agent.node.registration import FREE_MEMORY_STEP, STATUS_REFRESH_S, _raw, status_due
from mlxpool.nodes import LoadedModel, NodeStatus, lease_object, lease_renewal, micro_time

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
GIB = 1 << 30


def status(*, ready: bool = True, models: tuple[str, ...] = ("m",), free: int | None = 8 * GIB,
           at: datetime = NOW) -> NodeStatus:
    return NodeStatus(ready=ready, models=[LoadedModel(name=m) for m in models], heartbeat_time=at,
                      free_memory_bytes=free, agent_version="1")


WRITTEN = status()


@pytest.mark.parametrize(("new", "since", "due"), [
    (status(at=NOW + timedelta(seconds=10)), 10.0, False),  # only the heartbeat moved
    (status(free=8 * GIB + FREE_MEMORY_STEP - 1), 10.0, False),  # free memory jitters
    (status(free=8 * GIB - FREE_MEMORY_STEP), 10.0, True),  # ... until it moved a step
    (status(free=None), 10.0, True),
    (status(ready=False), 0.1, True),  # draining: at once
    (status(models=("m", "n")), 0.1, True),  # a load finished
    (status(models=()), 0.1, True),
    (status(), STATUS_REFRESH_S, True),  # unchanged, but not written for a long time
])
def test_status_is_written_only_when_it_changed(new, since, due):
    assert status_due(new, WRITTEN, since) is due


def test_the_first_status_is_always_written():
    assert status_due(WRITTEN, None, 0.0)


def test_lease_round_trip():
    body = lease_object("mac-01", "mlxpool-system", 10.0, NOW)
    assert body["spec"] == {"holderIdentity": "mac-01", "leaseDurationSeconds": 40,
                            "renewTime": "2026-01-01T12:00:00.000000Z"}
    assert lease_renewal(body) == ("mac-01", NOW)
    assert lease_renewal({"metadata": {"name": "x"}, "spec": {}}) == ("x", None)
    assert micro_time(NOW + timedelta(microseconds=5)) == "2026-01-01T12:00:00.000005Z"


@pytest.mark.parametrize(("body", "error"), [
    ({"metadata": {}, "spec": {}}, "without a name"),
    ({"metadata": {"name": "x"}, "spec": {"renewTime": "yesterday"}}, "renewTime 'yesterday' is not a time"),
])
def test_bad_leases_are_named(body, error):
    with pytest.raises(ValueError, match=error):
        lease_renewal(body)


class RawResponse:
    """What kubernetes_asyncio returns with `_preload_content=False`: aiohttp's response."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.reason, self._body, self.released = status, "Whatever", body, False

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        self.released = True


async def test_a_raw_renewal_answer_is_released_and_an_error_raises_as_a_parsed_one_would():
    async def answer(response: RawResponse) -> RawResponse:
        return response

    ok = RawResponse(200, b'{"kind": "Lease"}')
    await _raw(answer(ok))
    assert ok.released
    gone = RawResponse(404, b'{"reason": "NotFound"}')
    with pytest.raises(ApiException) as caught:
        await _raw(answer(gone))
    assert gone.released and caught.value.status == 404 and "NotFound" in caught.value.body
