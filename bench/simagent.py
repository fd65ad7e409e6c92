"""One simulated agent: the agent's HTTP contract without MLX, for control-plane work.

Answers `/health`, `/ready`, `/metrics` (the vLLM-compatible gauges and the
generated-token counter, from values the test sets) and the whole operations API of
`mlxpool.agentapi` behind the same bearer-token rules as the real agent (403 when no
token is configured, 401 for a wrong one). Loading and staging are timed state
machines: a load goes `loading` -> `ready` after `load_seconds`; a staging goes
`Downloading` (progress) -> `Verifying` -> `Cached` (-> `Warm`/`Pinned`) over
`stage_seconds`. `file://` sources are read for real (sizes, sha256 of every file with
a digest: a mismatch fails naming the file); `http(s)://` sources download the files
named by the digests (verified) from a real server; `hf://` is simulated. A model
path or source containing `simulate-failure` fails. Every call is counted, so tests can prove the
operator repeats nothing.

With `SimSettings.timing` set it also serves the inference API of every ready model:
`/v1/completions` and `/v1/chat/completions` (streamed or not, `stream_options.include_usage`,
`max_tokens`, `priority`/`x-priority`), `/v1/models` and `/v1/signals`, timed by
`bench.simagent_engine` (a documented model: prefill rate, decode step time by batch size,
slots, queue, prefix cache). Generated text is filler; the timing is the point. A
benchmark tool: tests of the agent use the real agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from bench.simagent_engine import QueueFull, SimEngine, TimingModel
from mlxpool.agentapi import (
    CACHE_KEY_PATTERN,
    OPS_PREFIX,
    CacheEntry,
    CachePhase,
    LoadModelRequest,
    ModelPhase,
    ModelState,
    NodeReport,
    QueueReport,
    StageRequest,
)
from mlxpool.loadsignals import SIGNALS_PATH, AgentSignals
from mlxpool.nodes import Hardware, LoadedModel, NodeStatus
from mlxpool.priorities import PRIORITY_HEADER, Priority

GIB = 1 << 30
READY_CACHE = {CachePhase.CACHED, CachePhase.WARM, CachePhase.PINNED}
FAILURE_MARK = "simulate-failure"


@dataclass
class SimSettings:
    max_models: int = 4
    memory_bytes: int = 64 * GIB
    model_bytes: int = 1 * GIB
    load_seconds: float = 0.5
    stage_seconds: float = 0.5
    token: str | None = None
    timing: TimingModel | None = None
    """Serve the inference API on this timing model (None: no inference routes, 404)."""


@dataclass
class Usage:
    running: int = 0
    waiting: int = 0
    tokens: int = 0


@dataclass
class SimAgent:
    name: str
    port: int
    settings: SimSettings
    models: dict[str, ModelState] = field(default_factory=dict)
    cache: dict[str, CacheEntry] = field(default_factory=dict)
    stage_requests: dict[str, StageRequest] = field(default_factory=dict)
    cache_of_model: dict[str, str] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    ready: bool = True
    engines: dict[str, SimEngine] = field(default_factory=dict)
    _tasks: set = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what the node reports -----------------------------------------------------------
    def hardware(self) -> Hardware:
        return Hardware(chip="simulated", memory_bytes=self.settings.memory_bytes, cpu_cores=8,
                        accelerator="cpu", platform="sim")

    def free_memory(self) -> int:
        used = sum(m.memory_bytes or 0 for m in self.models.values() if m.phase != ModelPhase.FAILED)
        return max(self.settings.memory_bytes - used, 0)

    def report(self) -> NodeReport:
        waiting = sum(u.waiting for u in self.usage.values())
        running = sum(u.running for u in self.usage.values())
        return NodeReport(name=self.name, endpoint=self.url, hardware=self.hardware(),
                          max_models=self.settings.max_models, free_memory_bytes=self.free_memory(),
                          models=list(self.models.values()), cache=list(self.cache.values()),
                          queue=QueueReport(running=running, waiting=waiting), agent_version="sim")

    def node_status(self, now: datetime) -> NodeStatus:
        return NodeStatus(ready=self.ready, heartbeat_time=now.replace(microsecond=0),
                          free_memory_bytes=self.free_memory(), agent_version="sim",
                          models=[LoadedModel(name=m.name, memory_bytes=m.memory_bytes)
                                  for m in self.models.values() if m.phase == ModelPhase.READY])

    def preload(self, name: str) -> None:
        self.models[name] = ModelState(name=name, phase=ModelPhase.READY, path=f"/sim/{name}",
                                       memory_bytes=self.settings.model_bytes, load_time_seconds=0.0)

    def forget_everything(self) -> None:
        """What a restarted agent process holds: nothing loaded (its cache dir stays)."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self.models.clear()
        self.usage.clear()
        for engine in self.engines.values():
            engine.abort()
        self.engines.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- HTTP ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/watch", self._health_watch)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get(OPS_PREFIX, self._node)
        app.router.add_post(f"{OPS_PREFIX}/models", self._load)
        app.router.add_delete(f"{OPS_PREFIX}/models/{{name}}", self._unload)
        app.router.add_get(f"{OPS_PREFIX}/cache", self._cache_list)
        app.router.add_put(f"{OPS_PREFIX}/cache/{{key}}", self._stage)
        app.router.add_get(f"{OPS_PREFIX}/cache/{{key}}", self._cache_get)
        app.router.add_delete(f"{OPS_PREFIX}/cache/{{key}}", self._cache_delete)
        if self.settings.timing is not None:
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_post("/v1/chat/completions", self._chat_completions)
            app.router.add_get("/v1/models", self._models)
            app.router.add_get(SIGNALS_PATH, self._signals)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(OPS_PREFIX):
            if self.settings.token is None:
                return _error(403, "the operations API is disabled: no ops token is configured", "forbidden")
            if request.headers.get("Authorization") != f"Bearer {self.settings.token}":
                return _error(401, "missing or wrong bearer token", "unauthorized")
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        self.calls["health"] += 1
        return web.json_response({"status": "ok"})

    async def _health_watch(self, request: web.Request) -> web.StreamResponse:
        """As the agent's: a line now and every `interval` seconds until the agent is killed
        (which closes the connection: that is what the watcher hears)."""
        self.calls["health_watch"] += 1
        interval = float(request.query.get("interval", "10"))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        while True:
            await response.write(b'{"status":"alive"}\n')
            await asyncio.sleep(interval)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = []
        for kind, attr in (("gauge", "running"), ("gauge", "waiting")):
            name = f"vllm:num_requests_{attr}"
            lines += [f"# HELP {name} simulated", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{model_name="{m}"}} {getattr(u, attr)}' for m, u in sorted(self.usage.items())]
        lines += ["# HELP mlxpool_generation_tokens_total simulated", "# TYPE mlxpool_generation_tokens_total counter"]
        lines += [f'mlxpool_generation_tokens_total{{model_name="{m}"}} {u.tokens}'
                  for m, u in sorted(self.usage.items())]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _node(self, request: web.Request) -> web.Response:
        self.calls["report"] += 1
        return _model(self.report())

    async def _load(self, request: web.Request) -> web.Response:
        self.calls["load"] += 1
        try:
            body = LoadModelRequest.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            return _error(400, f"invalid load request: {exc}", "invalid_request_error")
        current = self.models.get(body.name)
        if current is not None and current.phase != ModelPhase.FAILED:
            return _model(current, 200 if current.phase == ModelPhase.READY else 202)
        if body.cache_key is not None:
            entry = self.cache.get(body.cache_key)
            if entry is None or entry.phase not in READY_CACHE:
                return _error(409, f"cache entry {body.cache_key} is not staged here", "conflict", "cache_key")
        held = sum(m.phase != ModelPhase.FAILED for m in self.models.values())
        if held >= self.settings.max_models:
            return _error(409, f"no free model slot ({held} of {self.settings.max_models} in use)", "capacity")
        if self.free_memory() < self.settings.model_bytes:
            return _error(507, "not enough free memory for the model", "capacity")
        state = ModelState(name=body.name, phase=ModelPhase.LOADING, path=body.path or f"/cache/{body.cache_key}",
                           memory_bytes=self.settings.model_bytes, pinned=body.pin, owner=body.owner)
        self.models[body.name] = state
        if body.cache_key:
            self.cache_of_model[body.name] = body.cache_key
        self._spawn(self._finish_load(body))
        return _model(state, 202)

    async def _finish_load(self, body: LoadModelRequest) -> None:
        await asyncio.sleep(self.settings.load_seconds)
        state = self.models.get(body.name)
        if state is None or state.phase != ModelPhase.LOADING:
            return
        if FAILURE_MARK in (body.path or body.cache_key or ""):
            self.models[body.name] = state.model_copy(update={"phase": ModelPhase.FAILED, "memory_bytes": None,
                                                              "message": f"cannot load {body.path}: simulated failure"})
            return
        self.models[body.name] = state.model_copy(update={"phase": ModelPhase.READY,
                                                          "load_time_seconds": self.settings.load_seconds})
        self.usage.setdefault(body.name, Usage())

    async def _unload(self, request: web.Request) -> web.Response:
        self.calls["unload"] += 1
        name = request.match_info["name"]
        state = self.models.get(name)
        if state is None:
            return _error(404, f"model {name} is not loaded", "not_found", "name")
        state = state.model_copy(update={"phase": ModelPhase.UNLOADING})
        self.models[name] = state
        self._spawn(self._finish_unload(name))
        return _model(state)

    async def _finish_unload(self, name: str) -> None:
        await asyncio.sleep(0.05)
        if (state := self.models.get(name)) is not None and state.phase == ModelPhase.UNLOADING:
            del self.models[name]
            self.usage.pop(name, None)
            self.cache_of_model.pop(name, None)

    async def _cache_list(self, request: web.Request) -> web.Response:
        return web.json_response([e.model_dump(mode="json") for e in self.cache.values()])

    async def _stage(self, request: web.Request) -> web.Response:
        self.calls["stage"] += 1
        key = request.match_info["key"]
        if not re.match(CACHE_KEY_PATTERN, key):
            return _error(400, f"cache key {key!r} must match {CACHE_KEY_PATTERN}", "invalid_request_error", "key")
        try:
            body = StageRequest.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            return _error(400, f"invalid stage request: {exc}", "invalid_request_error")
        entry = self.cache.get(key)
        previous = self.stage_requests.get(key)
        self.stage_requests[key] = body
        if entry is not None and previous is not None and previous.model_copy(
                update={"warm": body.warm, "pin": body.pin}) == body:
            if entry.phase in READY_CACHE:  # same bytes; warm/pin may have changed
                entry = entry.model_copy(update={"phase": _finished_phase(body)})
                self.cache[key] = entry
            return _model(entry, 202)
        entry = CacheEntry(key=key, source=body.source, phase=CachePhase.PENDING)
        self.cache[key] = entry
        self._spawn(self._run_stage(key, body))
        return _model(entry, 202)

    async def _run_stage(self, key: str, body: StageRequest) -> None:
        def update(**fields: Any) -> None:
            self.cache[key] = self.cache[key].model_copy(update=fields)

        try:
            files = await _fetch(body)
        except (OSError, httpx.HTTPError, ValueError) as exc:
            update(phase=CachePhase.FAILED, message=str(exc)[:300])
            return
        total = sum(len(data) for data in files.values()) or self.settings.model_bytes
        steps = 5
        for step in range(1, steps + 1):
            await asyncio.sleep(self.settings.stage_seconds / (steps + 1))
            update(phase=CachePhase.DOWNLOADING, progress=step / steps, bytes_total=total,
                   bytes_done=total * step // steps)
        update(phase=CachePhase.VERIFYING)
        await asyncio.sleep(self.settings.stage_seconds / (steps + 1))
        for path, digest in body.digests.items():
            if path not in files:
                update(phase=CachePhase.FAILED, message=f"{path}: listed in digests but not in the source")
                return
            if hashlib.sha256(files[path]).hexdigest() != digest:
                update(phase=CachePhase.FAILED, message=f"{path}: sha256 mismatch")
                return
        update(phase=_finished_phase(body), path=f"/cache/{key}",
               load_time_seconds=0.01 if body.warm else None)

    async def _cache_get(self, request: web.Request) -> web.Response:
        self.calls["cache_get"] += 1
        entry = self.cache.get(request.match_info["key"])
        if entry is None:
            return _error(404, f"no cache entry {request.match_info['key']}", "not_found", "key")
        return _model(entry)

    async def _cache_delete(self, request: web.Request) -> web.Response:
        self.calls["cache_delete"] += 1
        key = request.match_info["key"]
        if key not in self.cache:
            return _error(404, f"no cache entry {key}", "not_found", "key")
        users = sorted(m for m, k in self.cache_of_model.items() if k == key and m in self.models)
        if users:
            return _error(409, f"cache entry {key} is used by loaded model(s): {', '.join(users)}", "conflict", "key")
        del self.cache[key]
        self.stage_requests.pop(key, None)
        return web.json_response({"deleted": key})


    # -- inference (only with settings.timing) ------------------------------------------------
    def engine(self, model: str) -> SimEngine | None:
        """The model's engine, started on first use; None unless the model is ready here."""
        state = self.models.get(model)
        if state is None or state.phase != ModelPhase.READY or self.settings.timing is None:
            return None
        engine = self.engines.get(model)
        if engine is None:
            engine = self.engines[model] = SimEngine(self.settings.timing)
            engine.start()
        return engine

    async def _models(self, request: web.Request) -> web.Response:
        ready = [m.name for m in self.models.values() if m.phase == ModelPhase.READY]
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "mlxpool-sim"} for name in ready]})

    async def _signals(self, request: web.Request) -> web.Response:
        models = {name: e.signals() for name, e in self.engines.items() if name in self.models}
        for m in self.models.values():  # ready but never asked: idle figures
            if m.phase == ModelPhase.READY and m.name not in models and self.settings.timing is not None:
                models[m.name] = SimEngine(self.settings.timing).signals()
        body = AgentSignals(models=models).model_dump_json().encode()
        return web.Response(body=body, content_type="application/json")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, chat=True)

    async def _infer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.calls["chat" if chat else "completions"] += 1
        try:
            parsed = _parse_inference(await request.read(), request.headers, chat)
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error")
        engine = self.engine(parsed.model)
        if engine is None:
            return _error(404, f"model {parsed.model!r} is not served here", "model_not_found", "model")
        try:
            seq = engine.submit(parsed.prompt, parsed.max_tokens, parsed.priority)
        except QueueFull as exc:
            return _error(429, f"queue full: {exc}", "queue_full")
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        usage = {"prompt_tokens": seq.prompt_tokens, "completion_tokens": 0, "total_tokens": seq.prompt_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        try:
            if not parsed.stream:
                while await seq.tokens.get():
                    pass
                if seq.aborted:
                    raise ConnectionAbortedError("the simulated agent stopped")
                usage.update(completion_tokens=seq.generated, total_tokens=seq.prompt_tokens + seq.generated)
                usage["prompt_tokens_details"] = {"cached_tokens": seq.cached_tokens}
                text = FILLER * seq.generated
                choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "length"} if chat else
                                          {"index": 0, "text": text, "finish_reason": "length"})
                return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                          "created": created, "model": parsed.model, "choices": [choice],
                                          "usage": usage})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            chunk = _ChunkWriter(rid, created, parsed.model, chat)
            first = True
            while True:
                n = await seq.tokens.get()
                if seq.aborted:
                    raise ConnectionAbortedError("the simulated agent stopped mid-stream")
                ended = n == 0
                while not ended and not seq.tokens.empty():
                    more = seq.tokens.get_nowait()
                    ended = more == 0
                    n += more
                body = chunk.tokens(n, first) if n else b""
                first = False
                if ended:
                    body += chunk.finish()
                    if parsed.include_usage:
                        usage.update(completion_tokens=seq.generated, total_tokens=seq.prompt_tokens + seq.generated)
                        usage["prompt_tokens_details"] = {"cached_tokens": seq.cached_tokens}
                        body += chunk.usage(usage)
                    await response.write(body + b"data: [DONE]\n\n")
                    await response.write_eof()
                    return response
                await response.write(body)
        finally:
            if not seq.done:
                engine.cancel(seq)


FILLER = " tok"


@dataclass(frozen=True)
class _Inference:
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    include_usage: bool
    priority: Priority


MAX_SIM_TOKENS = 65536


def _parse_inference(raw: bytes, headers: Any, chat: bool) -> _Inference:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("'model' must be a non-empty string")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        prompt = "\n".join(m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    else:
        raw_prompt = body.get("prompt")
        if not isinstance(raw_prompt, str):
            raise ValueError("'prompt' must be a string")
        prompt = raw_prompt
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_SIM_TOKENS:
        raise ValueError(f"'max_tokens' must be an integer in [1, {MAX_SIM_TOKENS}]")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    tier = body.get("priority") or headers.get(PRIORITY_HEADER) or Priority.NORMAL.value
    try:
        priority = Priority(tier)
    except ValueError:
        raise ValueError(f"priority must be one of {', '.join(p.value for p in Priority)}") from None
    return _Inference(model, prompt, max_tokens, stream is True,
                      isinstance(options, dict) and options.get("include_usage") is True, priority)


class _ChunkWriter:
    """OpenAI stream chunks (text_completion or chat.completion.chunk) as SSE bytes."""

    def __init__(self, rid: str, created: int, model: str, chat: bool) -> None:
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}
        self.chat = chat

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**self.head, "choices": choices, **extra}).encode() + b"\n\n"

    def tokens(self, n: int, first: bool) -> bytes:
        """One event per token, as an engine streaming token by token sends them."""
        if self.chat:
            delta: dict[str, Any] = {"content": FILLER}
            opening = {"role": "assistant", **delta}
            events = [self._event([{"index": 0, "delta": opening if first and i == 0 else delta,
                                    "finish_reason": None}]) for i in range(n)]
        else:
            events = [self._event([{"index": 0, "text": FILLER, "finish_reason": None}])] * n
        return b"".join(events)

    def finish(self) -> bytes:
        if self.chat:
            return self._event([{"index": 0, "delta": {}, "finish_reason": "length"}])
        return self._event([{"index": 0, "text": "", "finish_reason": "length"}])

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._event([], usage=usage)


def _finished_phase(body: StageRequest) -> CachePhase:
    if body.warm and body.pin:
        return CachePhase.PINNED
    return CachePhase.WARM if body.warm else CachePhase.CACHED


def _read_tree(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def _fetch(body: StageRequest) -> dict[str, bytes]:
    """The files a staging brings in (path -> bytes); empty for a simulated source."""
    if FAILURE_MARK in body.source:
        raise ValueError(f"{body.source}: simulated download failure")
    parsed = urlparse(body.source)
    if parsed.scheme == "file":
        return await asyncio.to_thread(_read_tree, Path(unquote(parsed.path)))
    if parsed.scheme in ("http", "https") and body.digests:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            files = {}
            for path in body.digests:
                response = await client.get(f"{body.source.rstrip('/')}/{path}")
                response.raise_for_status()
                files[path] = response.content
            return files
    return {}


def _model(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


def _error(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": None}},
                             status=status)
