"""Opening a Kubernetes API client the same way in every component.

An explicit kubeconfig wins; otherwise the in-cluster ServiceAccount (the operator and
routers as pods); otherwise the default kubeconfig (`KUBECONFIG`, ~/.kube/config). The
only shared module that imports the Kubernetes client: components that never talk to
the API server never import it.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes_asyncio import client, config


async def open_api_client(kubeconfig: Path | str | None) -> client.ApiClient:
    """An API client from `kubeconfig`, else in-cluster config, else the default kubeconfig."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)
