"""Bearer-token checks for the agent's HTTP API, as FastAPI dependencies.

Two independent secrets:
- API keys for the inference endpoints (`/v1/completions`, `/v1/chat/completions`,
  `/v1/models`): optional. With none configured those endpoints are open (the
  usual single-user setup, and what a router in front of the agent expects).
- The ops token for the operations API under `/v1/node`: never open by accident.
  With no token configured every ops call answers 403 saying so; a missing or wrong
  token is 401.

Probes (`/health`, `/ready`) and `/metrics` take no credentials. Secrets come from
files (`--api-key-file`, `--ops-token-file`) or the environment (`MLXPOOL_API_KEY`,
`MLXPOOL_OPS_TOKEN`); `Credentials.load` resolves them. The app keeps its
`Credentials` in `app.state.credentials`, where the dependencies read them, so a
router of routes only needs `dependencies=[Depends(require_ops_token)]`.

Secrets from files rotate without a restart: `CredentialReloader` watches the files
(size, mtime, inode: an atomic rename or an in-place write both show) and swaps the
app's `Credentials` when they change. A file that became unreadable or empty keeps the
previous secrets (a half-written rotation must not open or lock the API) and is logged,
by path, never by content. Secrets from the environment are fixed for the process.

A line of the API key file may name its key, `name:key` (the name: letters, digits,
`_.-`, at most 64): the name is the key's identity for the scheduler (its highest tier in
`priority_scheduling.key_tiers`, its tenant in the fair share); an unnamed key is looked
up by itself and its tenant is `key-` + the start of its SHA-256 (no secret in a label).
`require_api_key` leaves the matched key's `KeyIdentity` in `request.state.api_key`.

Comparisons are constant-time (`hmac.compare_digest`). What this module does not do:
users, scopes, rate limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request

from mlxpool.agent.errors import AgentError

log = logging.getLogger(__name__)

API_KEY_ENV = "MLXPOOL_API_KEY"
OPS_TOKEN_ENV = "MLXPOOL_OPS_TOKEN"
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class Unauthorized(AgentError):
    """No credentials, or wrong ones: 401 with a Bearer challenge."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    headers = BEARER_CHALLENGE


class OpsDisabled(AgentError):
    """The ops API was called on an agent that has no ops token configured."""

    status_code = 403
    error_type = "permission_error"
    code = "ops_api_disabled"


_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """Who a request's API key is, as the scheduler sees it."""

    ref: str
    """What `priority_scheduling.key_tiers` is keyed by: the key's name, else the key itself."""
    tenant: str
    """Its tenant in the fair share (never the secret itself)."""


def split_named_key(line: str) -> tuple[str | None, str]:
    """`name:key` -> (name, key); a line without a valid name before a colon is a bare key."""
    name, sep, key = line.partition(":")
    if sep and key.strip() and _KEY_NAME.match(name.strip()):
        return name.strip(), key.strip()
    return None, line


def read_secrets(path: str | Path) -> list[str]:
    """The secrets in a file: one per line; blank lines and `#` comments skipped.

    Raises ValueError naming the file when it cannot be read or holds no secret.
    """
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {str(path)!r}: {exc.strerror or exc}") from None
    secrets = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not secrets:
        raise ValueError(f"secret file {str(path)!r} holds no secret")
    return secrets


@dataclass(frozen=True)
class Credentials:
    api_keys: frozenset[str] = field(default_factory=frozenset)
    """Keys accepted on the inference endpoints; empty means those endpoints are open."""
    key_names: tuple[tuple[str, str], ...] = ()
    """(key, name) of the keys named in the key file."""
    ops_token: str | None = None
    """The ops API token; None means the ops API refuses every call (403)."""

    @classmethod
    def load(cls, api_key_file: str | Path | None = None, ops_token_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None) -> Credentials:
        """Files win over the environment; ValueError names an unreadable or empty file."""
        env = os.environ if environ is None else environ
        lines: Iterable[str] = read_secrets(api_key_file) if api_key_file else _env_secret(env, API_KEY_ENV)
        keys: list[str] = []
        names: dict[str, str] = {}
        for line in lines:
            name, key = split_named_key(line)
            keys.append(key)
            if name is not None:
                names[key] = name
        ops: str | None
        if ops_token_file:
            tokens = read_secrets(ops_token_file)
            if len(tokens) > 1:
                raise ValueError(f"ops token file {str(ops_token_file)!r} holds {len(tokens)} lines; expected one")
            ops = tokens[0]
        else:
            ops = next(iter(_env_secret(env, OPS_TOKEN_ENV)), None)
        return cls(api_keys=frozenset(keys), key_names=tuple(sorted(names.items())), ops_token=ops)

    @property
    def inference_open(self) -> bool:
        return not self.api_keys

    def check_api_key(self, authorization: str | None) -> KeyIdentity | None:
        """The presented key's identity; None when the endpoints are open (no key needed)."""
        if self.inference_open:
            return None
        presented = _bearer(authorization)
        # Compare against every key (no early exit): timing reveals nothing about which matched.
        matched: str | None = None
        for key in self.api_keys:
            if hmac.compare_digest(presented.encode(), key.encode()):
                matched = key
        if matched is None:
            raise Unauthorized("invalid API key")
        name = dict(self.key_names).get(matched)
        if name is not None:
            return KeyIdentity(name, name)
        return KeyIdentity(matched, "key-" + hashlib.sha256(matched.encode()).hexdigest()[:12])

    def check_ops_token(self, authorization: str | None) -> None:
        if self.ops_token is None:
            raise OpsDisabled(
                "the operations API is disabled: this agent has no ops token "
                f"(start it with --ops-token-file or {OPS_TOKEN_ENV})"
            )
        if not hmac.compare_digest(_bearer(authorization).encode(), self.ops_token.encode()):
            raise Unauthorized("invalid ops token")


def require_api_key(request: Request) -> None:
    """FastAPI dependency for the inference endpoints; leaves the key's identity in `request.state.api_key`."""
    request.state.api_key = _credentials(request).check_api_key(request.headers.get("authorization"))


def require_ops_token(request: Request) -> None:
    """FastAPI dependency for the operations API (`/v1/node`)."""
    _credentials(request).check_ops_token(request.headers.get("authorization"))


def _credentials(request: Request) -> Credentials:
    # An app built without credentials has open inference and a closed ops API.
    return _credentials_of(request.app)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    return token.strip()


def _env_secret(env: Mapping[str, str], name: str) -> list[str]:
    value = env.get(name, "").strip()
    return [value] if value else []


class CredentialReloader:
    """Re-reads the secret files every `interval` seconds when they changed; `run()` until cancelled."""

    def __init__(self, app: FastAPI, api_key_file: str | Path | None, ops_token_file: str | Path | None,
                 interval: float = 1.0) -> None:
        self.app = app
        self.files = (api_key_file, ops_token_file)
        self.interval = interval
        self._seen = self._stamp()

    @property
    def watching(self) -> bool:
        return any(self.files)

    def _stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self.files:
            try:
                st = os.stat(Path(path).expanduser()) if path else None
            except OSError:
                st = None
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns) if st else None)
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Swap the app's credentials if a file changed and still holds secrets; whether it swapped."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            fresh = Credentials.load(*self.files)
        except ValueError as exc:  # the message names the file, never a secret
            log.warning("secret files changed but cannot be used; keeping the previous secrets error=%s", exc)
            return False
        current = _credentials_of(self.app)
        if fresh == current:
            return False
        self.app.state.credentials = fresh
        log.info("secrets reloaded api_keys=%d ops_token=%s", len(fresh.api_keys),
                 "set" if fresh.ops_token else "unset")
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.reload_if_changed)  # file reads stay off the event loop


def _credentials_of(app: FastAPI) -> Credentials:
    credentials = getattr(app.state, "credentials", None)
    return credentials if isinstance(credentials, Credentials) else Credentials()
