"""The serving path between the HTTP layer and the engine, transport-agnostic.

- `dataplane`: OpenAI requests in, OpenAI responses (whole or chunk streams) out:
  resolve the model, encode, fix defaults, check the context, run on the engine.
- `openai`: the OpenAI wire models; `shaping`: token events into their shapes.
- `repository`: the models this agent serves, by the name clients use.
- `servedengine`: a served model's engine as requests reach it: each request counted
  in flight, its prompt looked up in the prompt cache before the engine gets it.
- `lifecycle`: the agent's phase and its in-flight requests, in total (what a drain
  waits for) and per model (what an unload waits for).
- `promptcache`: prompt KV state beyond the engine's own in-memory prefix cache: the
  fleet-wide tier shared through Redis (Redis only here), or none.

Nothing here imports MLX or a web framework: engines are reached through
`engine.interface`, and the HTTP layer calls in.
"""
