"""Many simulated agents in one asyncio process, registered like real ones.

`python -m bench.simagents --count 50 --kubeconfig K ...` starts `count` agents
(`bench.simagent`), each on its own 127.0.0.1 port, each registering its
InferenceNode and heartbeating through the API server with the agent's own code
(`mlxpool.agent.node.registration`), as the identity in the kubeconfig. A control API on
another port lets a benchmark or a test act on them:

| method and path                      | effect                                             |
|--------------------------------------|----------------------------------------------------|
| GET  /agents                         | every agent: url, alive, ready, calls, models (and owners), cache |
| POST /agents/{name}/kill             | stop answering and close the port, stop beating    |
| POST /agents/{name}/revive           | answer again on the same port, holding nothing     |
| POST /agents/{name}/ready  {ready}   | what /ready and the heartbeat say                  |
| POST /agents/{name}/heartbeat {paused} | stop or resume heartbeats (a stale node)         |
| POST /agents/{name}/usage {model, running, waiting, tokens} | what /metrics says   |

With `--inference` every agent also serves the inference API of its preloaded models on
`bench.simagent_engine`'s timing model (`--slots`, `--prefill-tps`, `--step-base-ms`,
`--step-per-seq-ms`, `--speeds` one factor per agent, cycled), and `GET /agents` adds
each agent's engine counters (requests, tokens, cached prompt tokens, host lag).

Agents are named `PREFIX-NNN` from `--first` on, so a fleet can be split over several
processes (`bench.controlplane` starts one per 250 agents): one event loop serving a
thousand agents' probes, watches and reports and renewing their leases lags enough to
time renewals out on a busy machine. Lease renewals read their answer raw (not parsed
into the client's models), and the API client does not read the environment (proxies,
netrc) at every request.

Prints `simagents ready url=http://127.0.0.1:PORT agents=N` once every agent answers
and has registered. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

from bench.simagent import GIB, SimAgent, SimSettings, Usage
from bench.simagent_engine import TimingModel
from mlxpool.agent.node.registration import NodeRegistrar
from mlxpool.dev.processes import LOOPBACK
from mlxpool.nodes import NodeSpec, NodeStatus

log = logging.getLogger("simagents")


@dataclass
class Hosted:
    agent: SimAgent
    runner: web.AppRunner | None = None
    registrar: NodeRegistrar | None = None
    beating: asyncio.Task[None] | None = None
    paused: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.runner is not None


class SimFleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        token = args.ops_token_file.read_text().strip() if args.ops_token_file else None
        settings = SimSettings(max_models=args.max_models, memory_bytes=int(args.memory_gib * GIB),
                               model_bytes=int(args.model_gib * GIB), load_seconds=args.load_seconds,
                               stage_seconds=args.stage_seconds, token=token)
        labels = dict(pair.split("=", 1) for pair in args.label)
        self.api_client: ApiClient | None = None
        """One API client for every agent: a thousand would each load the kubeconfig and keep a pool."""
        self.hosted = {}
        speeds = [float(x) for x in args.speeds.split(",")] if args.speeds else [1.0]
        for i in range(args.first, args.first + args.count):
            name = f"{args.prefix}-{i:03d}"
            agent_settings = settings
            if args.inference:
                timing = TimingModel(slots=args.slots, prefill_tokens_per_second=args.prefill_tps,
                                     step_base_seconds=args.step_base_ms / 1000,
                                     step_per_sequence_seconds=args.step_per_seq_ms / 1000,
                                     max_queue=args.max_queue, speed=speeds[i % len(speeds)],
                                     prefix_cache_blocks=args.prefix_cache_blocks)
                agent_settings = dataclasses.replace(settings, timing=timing)
            agent = SimAgent(name, 0, agent_settings)
            for model in args.preload:
                agent.preload(model)
            self.hosted[name] = Hosted(agent, labels=labels)

    async def start_agent(self, hosted: Hosted) -> None:
        hosted.runner = web.AppRunner(hosted.agent.app(), access_log=None, shutdown_timeout=0.1)
        await hosted.runner.setup()
        # Port 0 the first time (the kernel picks, no race between agents); the same port on revival.
        site = web.TCPSite(hosted.runner, LOOPBACK, hosted.agent.port, reuse_address=True)
        await site.start()
        hosted.agent.port = hosted.runner.addresses[0][1]
        if self.args.kubeconfig is not None:
            if hosted.registrar is None:
                spec = NodeSpec(endpoint=hosted.agent.url, hardware=hosted.agent.hardware(),
                                max_models=hosted.agent.settings.max_models)

                async def status(agent: SimAgent = hosted.agent) -> NodeStatus:
                    return agent.node_status(datetime.now(UTC))

                hosted.registrar = NodeRegistrar(str(self.args.kubeconfig), hosted.agent.name, hosted.labels, spec,
                                                 status, interval=self.args.heartbeat_interval,
                                                 api_client=self.api_client)
            await hosted.registrar.beat()
            hosted.beating = asyncio.create_task(self._beat(hosted))

    async def _beat(self, hosted: Hosted) -> None:
        # Spread the fleet's beats over the interval, as independent machines would be.
        await asyncio.sleep(random.uniform(0, self.args.heartbeat_interval))
        while True:
            if not hosted.paused and hosted.registrar is not None:
                await hosted.registrar.beat()
            await asyncio.sleep(self.args.heartbeat_interval)

    async def kill(self, hosted: Hosted) -> None:
        if hosted.beating is not None:
            hosted.beating.cancel()
            await asyncio.gather(hosted.beating, return_exceptions=True)
            hosted.beating = None
        if hosted.runner is not None:
            await hosted.runner.cleanup()  # closes the listening socket and open connections
            hosted.runner = None
        hosted.agent.forget_everything()

    async def start(self) -> None:
        if self.args.kubeconfig is not None:
            configuration = Configuration()
            await kube_config.load_kube_config(config_file=str(self.args.kubeconfig),
                                               client_configuration=configuration)
            configuration.connection_pool_maxsize = 32  # read when the client is made
            self.api_client = ApiClient(configuration)
            # kubernetes_asyncio's session trusts the environment: aiohttp then looks for
            # proxies and reads ~/.netrc at every request (4% of this process's CPU).
            session = self.api_client.rest_client.pool_manager
            session._trust_env = False  # no public setter; the session is ours
        # In batches: a thousand registrations at once would time out against one API server.
        agents = list(self.hosted.values())
        for start in range(0, len(agents), 50):
            await asyncio.gather(*(self.start_agent(h) for h in agents[start:start + 50]))

    async def stop(self) -> None:
        await asyncio.gather(*(self.kill(h) for h in self.hosted.values()))
        for h in self.hosted.values():
            if h.registrar is not None:
                await h.registrar.close()
        if self.api_client is not None:
            await self.api_client.close()

    # -- control API -------------------------------------------------------------------
    def control_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/agents", self._list)
        app.router.add_post("/agents/{name}/{action}", self._act)
        return app

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response([{
            "name": h.agent.name, "url": h.agent.url, "alive": h.alive, "ready": h.agent.ready,
            "heartbeat_paused": h.paused, "calls": dict(h.agent.calls),
            "models": {m.name: m.phase.value for m in h.agent.models.values()},
            "owners": {m.name: m.owner for m in h.agent.models.values()},
            "cache": {e.key: e.phase.value for e in h.agent.cache.values()},
            "engines": {m: {"requests": e.requests_total, "refused": e.refused_total,
                            "prompt_tokens": e.prompt_tokens_total, "cached_tokens": e.cached_tokens_total,
                            "generated_tokens": e.generated_tokens_total, "lag_seconds": round(e.lag_seconds, 3),
                            "speed": e.model.speed}
                        for m, e in h.agent.engines.items()},
        } for h in self.hosted.values()])

    async def _act(self, request: web.Request) -> web.Response:
        hosted = self.hosted.get(request.match_info["name"])
        if hosted is None:
            return web.json_response({"error": "no such agent"}, status=404)
        action = request.match_info["action"]
        body = await request.json() if request.can_read_body else {}
        if action == "kill":
            started = time.monotonic()
            await self.kill(hosted)
            # WARNING: the level this tool logs at; a kill is rare (the bench's failover phase),
            # and when it was done is where a failover trace starts.
            log.warning("agent killed name=%s took_s=%.3f", hosted.agent.name, time.monotonic() - started)
        elif action == "revive":
            if not hosted.alive:
                await self.start_agent(hosted)
        elif action == "ready":
            hosted.agent.ready = bool(body["ready"])
            if hosted.registrar is not None and hosted.alive:
                await hosted.registrar.beat()
        elif action == "heartbeat":
            hosted.paused = bool(body["paused"])
        elif action == "usage":
            hosted.agent.usage[body["model"]] = Usage(int(body.get("running", 0)), int(body.get("waiting", 0)),
                                                      int(body.get("tokens", 0)))
        else:
            return web.json_response({"error": f"unknown action {action}"}, status=404)
        return web.json_response({"ok": True})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.simagents", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--first", type=int, default=0, help="the first agent's number (PREFIX-NNN)")
    parser.add_argument("--kubeconfig", type=Path, help="register InferenceNodes with this identity")
    parser.add_argument("--label", action="append", default=[], metavar="K=V")
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    parser.add_argument("--ops-token-file", type=Path)
    parser.add_argument("--max-models", type=int, default=4)
    parser.add_argument("--memory-gib", type=float, default=64.0)
    parser.add_argument("--model-gib", type=float, default=1.0)
    parser.add_argument("--load-seconds", type=float, default=0.5)
    parser.add_argument("--stage-seconds", type=float, default=0.5)
    parser.add_argument("--preload", action="append", default=[], metavar="MODEL",
                        help="a model every agent serves from the start (like the agent's --model)")
    parser.add_argument("--control-port", type=int, default=0)
    inference = parser.add_argument_group("inference API (bench.simagent_engine's timing model)")
    defaults = TimingModel()
    inference.add_argument("--inference", action="store_true", help="serve completions on the timing model")
    inference.add_argument("--slots", type=int, default=defaults.slots)
    inference.add_argument("--prefill-tps", type=float, default=defaults.prefill_tokens_per_second)
    inference.add_argument("--step-base-ms", type=float, default=defaults.step_base_seconds * 1000)
    inference.add_argument("--step-per-seq-ms", type=float, default=defaults.step_per_sequence_seconds * 1000)
    inference.add_argument("--max-queue", type=int, default=defaults.max_queue)
    inference.add_argument("--prefix-cache-blocks", type=int, default=defaults.prefix_cache_blocks)
    inference.add_argument("--speeds", default="", metavar="F,F,...",
                           help="speed factor per agent, cycled (e.g. 1,1,1,0.5: every 4th at half speed)")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    fleet = SimFleet(args)
    await fleet.start()
    control = web.AppRunner(fleet.control_app(), access_log=None)
    await control.setup()
    site = web.TCPSite(control, LOOPBACK, args.control_port)
    await site.start()
    port = control.addresses[0][1]
    print(f"simagents ready url=http://{LOOPBACK}:{port} agents={len(fleet.hosted)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fleet.stop()
    await control.cleanup()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
