"""mlxpool: LLM inference on fleets of Apple Silicon machines, managed the Kubernetes way.

This package is the bottom layer: the contracts the operator, the router and the node
agent share (resource names, the routing table, priorities, the node registration
shape) and the `mlxpool` CLI. It imports none of the components; they import it.
"""

__version__ = "0.1.0"
