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


SLOW_GO = """#!/bin/sh
while [ $# -gt 0 ]; do
  if [ "$1" = -o ]; then out=$2; fi
  shift
done
head -c 3000000 /dev/zero > "$out.scratch"
sleep 0.8
printf 'binary' > "$out"
chmod +x "$out"
"""


def _slow_go_env(tmp_path: Path) -> dict[str, str]:
    go = tmp_path / "go"
    go.write_text(SLOW_GO)
    go.chmod(0o755)
    return {**os.environ, "GO": str(go), "MLXPOOL_CACHE": str(tmp_path / "cache"), "MLXPOOL_BUILD_PROGRESS_S": "0.2"}


def test_a_log_gets_progress_lines_with_the_bytes_written_and_the_rate(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT)], env=_slow_go_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " building " in line]
    assert lines and "\r" not in result.stderr, result.stderr
    # The fake compiler wrote 3,000,000 bytes: its own I/O counters, read from /proc.
    assert any("wrote 2.9 MiB (" in line and "/s)" in line for line in lines), lines
    assert (tmp_path / "cache" / "controlplane" / "build-times").read_text().split()[::2] == [
        "kube-apiserver", "kubectl", "etcd"]


def test_a_terminal_gets_one_line_redrawn_with_a_bar_against_the_last_build(tmp_path: Path) -> None:
    import pty

    (tmp_path / "cache" / "controlplane").mkdir(parents=True)
    (tmp_path / "cache" / "controlplane" / "build-times").write_text("kube-apiserver 2\nkubectl 2\netcd 2\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([str(SCRIPT)], env=_slow_go_env(tmp_path), stdout=subprocess.PIPE, stderr=follower,
                            text=True)
    os.close(follower)
    out, _ = proc.communicate(timeout=30)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the script and its children closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    shown = b"".join(chunks).decode()
    assert proc.returncode == 0 and out.strip().endswith(tmp_path.name + "/cache/controlplane/" +
                                                         Path(out.strip()).name), shown
    assert "\r\x1b[2Kbuild-control-plane: [" in shown and "#" in shown and "last build 2s" in shown, shown
    assert "wrote 2.9 MiB" in shown and "(0 B/s)" not in shown, shown
