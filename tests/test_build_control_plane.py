"""hack/build-control-plane.sh: progress lines, one build at a time, reuse.

Fake here: `go` is a shell script that writes an empty file where `-o` points after a
pause (a real cold build takes minutes; the build itself is exercised by every session
that has no cached binaries). The script under test is the real one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mlxpool.dev.controlplane import REPO_ROOT

SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"
FAKE_GO = """#!/bin/sh
while [ $# -gt 0 ]; do
  if [ "$1" = -o ]; then out=$2; fi
  shift
done
sleep 0.3
printf 'binary' > "$out"
chmod +x "$out"
echo built >> "$CALLS"
"""


def test_two_concurrent_builds_make_one_and_both_get_the_binaries(tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.write_text(FAKE_GO)
    go.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "GO": str(go), "MLXPOOL_CACHE": str(tmp_path / "cache"), "CALLS": str(calls)}
    first = subprocess.Popen([str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The second starts once the first holds the lock (its first progress line is out).
    assert first.stderr is not None and "building into" in first.stderr.readline()
    second = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    out1, err1 = first.communicate(timeout=30)
    assert first.returncode == 0 and second.returncode == 0, (err1, second.stderr)
    out_dir = Path(out1.strip().splitlines()[-1])
    assert second.stdout.strip().splitlines()[-1] == str(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == [".complete", "etcd", "kube-apiserver", "kubectl"]
    assert calls.read_text().count("built") == 3  # the second waited and reused them
    assert "another build" in second.stderr and "waiting for it" in second.stderr
    for i, name in enumerate(["kube-apiserver", "kubectl", "etcd"], 1):
        assert f"[{i}/3] {name} ..." in err1 and f"[{i}/3] {name} built in" in err1

    again = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert again.stdout.strip() == str(out_dir) and again.stderr == ""
    assert calls.read_text().count("built") == 3


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.write_text("#!/bin/sh\necho 'compile error' >&2\nexit 1\n")
    go.chmod(0o755)
    env = {**os.environ, "GO": str(go), "MLXPOOL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "compile error" in result.stderr
    assert not list((tmp_path / "cache").rglob(".complete"))
