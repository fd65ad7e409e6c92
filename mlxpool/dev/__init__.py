"""Local development and test infrastructure: a real control plane and stack on loopback.

`controlplane` runs etcd + kube-apiserver built by hack/; `processes` starts and stops
the mlxpool components as child processes; `stack` composes them for `mlxpool dev
up|down|status` and `make demo`. Tests use the same code through their fixtures, so
what the demo runs is what the tests run.
"""
