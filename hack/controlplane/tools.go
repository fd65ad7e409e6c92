//go:build tools

// Package controlplane pins the Go modules that hack/build-control-plane.sh builds
// kube-apiserver, kubectl and etcd from. Nothing here is run; it only makes
// `go mod tidy` keep the requirements.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
