"""Raw HTTP for the reliability suites and the soak: one connection, exact bytes, no retries.

Client libraries hide what these checks are about (a reused keep-alive connection, a
body the server refused before it was sent, the exact error body), so the suites talk
through `http.client` and plain sockets here.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlsplit


def raw_post(conn: http.client.HTTPConnection, path: str, body: bytes,
             headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn.request("POST", path, body=body, headers={"content-type": "application/json", **headers})
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)


def openai_error(data: bytes) -> dict[str, Any]:
    """The body's `error` object; AssertionError when the body is not the OpenAI error shape."""
    body = json.loads(data)
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == {"message", "type", "param", "code"}
            and isinstance(body["error"]["message"], str) and body["error"]["message"]):
        raise AssertionError(f"not an OpenAI error body: {data[:300]!r}")
    return body["error"]


def send_head(url: str, path: str, headers: list[str], method: str = "POST") -> socket.socket:
    """A socket on which only the request line and `headers` were sent (no body yet)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10)
    head = f"{method} {path} HTTP/1.1\r\nhost: {parts.netloc}\r\n" + "".join(f"{h}\r\n" for h in headers)
    sock.sendall((head + "\r\n").encode("latin-1"))
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the one response on `sock` (a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the connection closed before a response: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, rest
