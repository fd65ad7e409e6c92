"""Names of the custom resources and of the objects derived from them.

One place for the strings that the CRDs, the operator, the router and the agent must
agree on; a typo in one of them would otherwise fail silently as an empty watch.
"""

from __future__ import annotations

GROUP = "mlxpool.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

POOL_KIND, POOL_PLURAL = "InferencePool", "inferencepools"
CACHE_KIND, CACHE_PLURAL = "ModelCache", "modelcaches"
NODE_KIND, NODE_PLURAL = "InferenceNode", "inferencenodes"

ROUTES_DATA_KEY = "routes.json"
"""The ConfigMap data key holding the routing table (see `mlxpool.routing`)."""

LABEL_POOL = f"{GROUP}/pool"
"""Label on objects the operator creates for a pool (the routing-table ConfigMap)."""

FINALIZER = f"{GROUP}/cleanup"


def routes_configmap_name(pool_name: str) -> str:
    """The routing-table ConfigMap of a pool: `<pool>-routes`."""
    return f"{pool_name}-routes"


NODE_LEASE_NAMESPACE = "mlxpool-system"
"""Where agents renew their node Leases (kubelets use `kube-node-lease`): one Lease per
InferenceNode, of the same name. Both the agent and the operator take another with
`--lease-namespace`."""

LABEL_NODE_LEASE = f"{GROUP}/node-lease"
"""Label on every node Lease (value "true"): the operator watches only those."""
