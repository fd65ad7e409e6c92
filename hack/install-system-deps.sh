#!/usr/bin/env bash
# Install the Debian packages the tests and the demo need, when they are missing:
# redis-server (the shared KV cache and its tests), OpenBLAS (MLX's Linux CPU backend
# is ~40x faster with it), openssl (control-plane keys). Needs root or sudo.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v openssl >/dev/null || need+=(openssl)
[[ "$(uname -s)" != Linux || -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 || "$(uname -m)" != x86_64 ]] || need+=(libopenblas0-pthread)
((${#need[@]})) || exit 0
sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
echo "install-system-deps: installing ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
