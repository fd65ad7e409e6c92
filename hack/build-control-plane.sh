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
# One build at a time per cache: a second caller (another make test, another worktree)
# waits for the first and then reuses its binaries instead of building them again.
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
if ! flock -n 9; then
  echo "build-control-plane: another build of $key is running; waiting for it" >&2
  flock 9
fi
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
# Progress: a line per step, and every 30 s while one runs (go build itself is silent).
build() { # step-number name ldflags package
  local t0=$SECONDS
  echo "build-control-plane: [$1/3] $2 ..." >&2
  # The ticker's sleep holds none of our descriptors (a caller reading our output, the
  # lock), so killing the ticker releases them at once.
  ( while sleep 30 </dev/null >/dev/null 2>&1 9>&-; do
      echo "build-control-plane: [$1/3] $2 still building ($((SECONDS - t0))s)" >&2; done ) &
  local ticker=$!
  "$GO" build -pgo=off -trimpath -ldflags "$3" -o "$out/$2.tmp" "$4" || { kill "$ticker"; return 1; }
  kill "$ticker"
  echo "build-control-plane: [$1/3] $2 built in $((SECONDS - t0))s ($(du -h "$out/$2.tmp" | cut -f1))" >&2
}
build 1 kube-apiserver "$(ver_ldflags "$k8s_version")" k8s.io/kubernetes/cmd/kube-apiserver
build 2 kubectl "$(ver_ldflags "$k8s_version")" k8s.io/kubernetes/cmd/kubectl
build 3 etcd "-s -w" go.etcd.io/etcd/server/v3
for b in kube-apiserver kubectl etcd; do mv "$out/$b.tmp" "$out/$b"; done
echo "$(( $(date +%s) - start ))" > "$out/.complete"
echo "build-control-plane: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
