"""This node's identity: what machine it is and the InferenceNode it registers.

- `hardware`: chip, memory, cores, accelerator, free memory (parsers apart from reads).
- `nodeinfo`: the InferenceNode's name, labels, spec and status, built from those.
- `registration`: creating the InferenceNode and beating its heartbeat (the
  Kubernetes client only here, imported lazily by the runtime).
"""
