#!/usr/bin/env bash
# Build kube-apiserver, kubectl and etcd from the Go module in hack/controlplane and
# cache them by version outside the work tree, so a second run does not rebuild.
# Prints the directory holding the binaries on its last line.
#
# Env: MLXPOOL_CACHE (default ~/.cache/mlxpool), GO (default: go on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod="$here/controlplane"
k8s_version="$(awk '$1=="k8s.io/kubernetes"{print $2; exit}' "$mod/go.mod")"
etcd_version="$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' "$mod/go.mod")"
# The key covers go.sum too: any change of a dependency means a new build.
key="k8s-${k8s_version}-etcd-${etcd_version}-$(sha256sum "$mod/go.sum" | cut -c1-12)"
out="${MLXPOOL_CACHE:-$HOME/.cache/mlxpool}/controlplane/$key"
GO="${GO:-go}"

if [[ -x "$out/kube-apiserver" && -x "$out/etcd" && -x "$out/kubectl" && -f "$out/.complete" ]]; then
  echo "$out"; exit 0
fi
command -v "$GO" >/dev/null || { echo "build-control-plane: Go is required to build kube-apiserver/etcd (or set KUBECONFIG to use an existing cluster)" >&2; exit 1; }
mkdir -p "$out"
cd "$mod"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false} -mod=mod"
ver_ldflags() { # pkg-path gitVersion
  echo "-s -w -X k8s.io/component-base/version.gitVersion=$1 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$1" | cut -d. -f2) -X k8s.io/client-go/pkg/version.gitVersion=$1"
}
start=$(date +%s)
echo "build-control-plane: building into $out (cold builds take 10-20 minutes on 2 cores)" >&2
"$GO" build -pgo=off -trimpath -ldflags "$(ver_ldflags "$k8s_version")" -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
"$GO" build -pgo=off -trimpath -ldflags "$(ver_ldflags "$k8s_version")" -o "$out/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
"$GO" build -pgo=off -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3
for b in kube-apiserver kubectl etcd; do mv "$out/$b.tmp" "$out/$b"; done
echo "$(( $(date +%s) - start ))" > "$out/.complete"
echo "build-control-plane: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
