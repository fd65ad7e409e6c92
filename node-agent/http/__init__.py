"""The agent's HTTP layer: everything that knows FastAPI, Starlette or a status code table.

- `app`: the app factory and the thin inference routes (parse, call the data plane,
  serialize; a client that goes away cancels its generation).
- `sse`: Server-Sent Events for a data-plane chunk stream.
- `disconnects`: noticing a client that went away (both of the above stop its generation).
- `auth`: API keys for inference, the bearer token of the operations API.
- `operations`: the operations API's routes (`/v1/node`), over `operations/`.
- `errors`: the one table mapping domain errors (`mlxpool.agent.errors`) to responses.
- `metrics`: Prometheus metrics of HTTP traffic, requests and the engines.

Below this layer nothing imports a web framework.
"""
