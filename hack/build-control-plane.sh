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
# Progress: a line per step, then, while go build (silent itself) runs, its elapsed time and
# the bytes it and the compilers it ran have read and written (/proc/PID/io, Linux; a reaped
# child's I/O is added to its parent's) with the write rate. On a terminal one line is redrawn
# every second, with a bar against the same step's time in the last build recorded here;
# otherwise a line every 30 s (MLXPOOL_BUILD_PROGRESS_S overrides).
times="$(dirname "$out")/build-times"
if [[ -t 2 ]]; then tty=1; every="${MLXPOOL_BUILD_PROGRESS_S:-1}"; else tty=0; every="${MLXPOOL_BUILD_PROGRESS_S:-30}"; fi
human() { # bytes -> "1.2 GiB"
  awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u, " "); i = 1
    while (b >= 1024 && i < 5) { b /= 1024; i++ }
    if (i == 1) printf "%d B", b; else printf "%.1f %s", b, u[i] }'
}
now_ms() { # milliseconds (bash 5's EPOCHREALTIME; whole seconds on older shells)
  if [[ -n "${EPOCHREALTIME:-}" ]]; then local t="${EPOCHREALTIME/[.,]/}"; echo $((10#$t / 1000)); else echo $((SECONDS * 1000)); fi
}
io_of() { # pid -> "read written" in bytes, or nothing where /proc/PID/io is not readable
  awk '$1=="rchar:"{r=$2} $1=="wchar:"{w=$2} END{if (r != "") print r, w}' "/proc/$1/io" 2>/dev/null || true
}
progress_line() { # step name pid t0-ms
  local ms=$(( $(now_ms) - $4 )) io read written rate bar="" expected line
  (( ms > 0 )) || ms=1
  io="$(io_of "$3")"
  line="[$1/3] $2 building $((ms / 1000))s"
  if [[ -n "$io" ]]; then
    read -r read written <<<"$io"
    rate=$(( written * 1000 / ms ))
    line="$line, read $(human "$read"), wrote $(human "$written") ($(human "$rate")/s)"
  fi
  expected="$(awk -v n="$2" '$1==n{print $2}' "$times" 2>/dev/null | tail -1)"
  if [[ -n "$expected" && "$expected" -gt 0 ]]; then
    local filled=$(( ms * 24 / (expected * 1000) )); (( filled > 24 )) && filled=24
    bar="[$(printf '%*s' "$filled" '' | tr ' ' '#')$(printf '%*s' $((24 - filled)) '' | tr ' ' '-')] "
    line="$line, last build ${expected}s"
  fi
  if (( tty )); then printf '\r\033[2Kbuild-control-plane: %s%s' "$bar" "$line" >&2
  else echo "build-control-plane: $line" >&2; fi
}
build() { # step-number name ldflags package
  local t0=$SECONDS rc=0
  echo "build-control-plane: [$1/3] $2 ..." >&2
  "$GO" build -pgo=off -trimpath -ldflags "$3" -o "$out/$2.tmp" "$4" &
  gopid=$!
  # The ticker's sleep holds none of our descriptors (a caller reading our output, the
  # lock), so killing the ticker releases them at once.
  local t0_ms; t0_ms="$(now_ms)"
  ( while sleep "$every" </dev/null >/dev/null 2>&1 9>&-; do progress_line "$1" "$2" "$gopid" "$t0_ms"; done ) 9>&- &
  ticker=$!
  wait "$gopid" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  gopid="" ticker=""
  (( tty )) && printf '\r\033[2K' >&2
  (( rc == 0 )) || return 1
  echo "$2 $((SECONDS - t0))" >> "$times"
  echo "build-control-plane: [$1/3] $2 built in $((SECONDS - t0))s ($(du -h "$out/$2.tmp" | cut -f1))" >&2
}
# go build runs in the background (to be watched): stop it with us.
gopid="" ticker=""
trap '[[ -n "$gopid" ]] && kill "$gopid" 2>/dev/null; [[ -n "$ticker" ]] && kill "$ticker" 2>/dev/null; exit 130' INT TERM
build 1 kube-apiserver "$(ver_ldflags "$k8s_version")" k8s.io/kubernetes/cmd/kube-apiserver
build 2 kubectl "$(ver_ldflags "$k8s_version")" k8s.io/kubernetes/cmd/kubectl
build 3 etcd "-s -w" go.etcd.io/etcd/server/v3
for b in kube-apiserver kubectl etcd; do mv "$out/$b.tmp" "$out/$b"; done
echo "$(( $(date +%s) - start ))" > "$out/.complete"
echo "build-control-plane: built in $(( $(date +%s) - start ))s" >&2
echo "$out"
