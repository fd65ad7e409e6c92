"""The `mlxpool` command: one entry point dispatching to each component.

Each component owns its own argument parsing (`main(argv) -> int`), so this module
stays a thin table and imports a component only when it is asked for: `mlxpool
router` never pays for importing MLX.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("mlxpool.dev.local:main_up", "agents + router on loopback, no Kubernetes: a first look in seconds"),
    "down": ("mlxpool.dev.local:main_down", "stop what `mlxpool up` started"),
    "agent": ("mlxpool.agent.main", "run a node agent serving models with MLX (install|uninstall: launchd)"),
    "router": ("mlxpool.router.main", "run a router following a pool's routing table"),
    "operator": ("mlxpool.operator.main", "run the kopf operator"),
    "status": ("mlxpool.status", "pools, nodes, models, routing revisions and recent Events of a cluster"),
    "dev": ("mlxpool.dev.main", "local control plane + operator + agents + router (up|down|status)"),
    "model": ("mlxpool.tinymodel", "make-tiny PATH: make a small random Llama model with a real tokenizer"),
}


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ: dict[str, str], thp_setting: str | None) -> dict[str, str] | None:
    """The environment to re-exec the agent with so that glibc's malloc marks its large
    mappings for transparent huge pages (MADV_HUGEPAGE), or None when nothing is to do.

    Why: MLX allocates the weights' and the KV cache's buffers with malloc; faulted in 4 KiB
    at a time, the one copy of the weights ran at ~1.2 GB/s on our CPU machines, with huge
    pages at ~2.6 GB/s (mlx_lm.load reads with several threads to get there). glibc reads
    tunables only at process start, hence the re-exec. MLXPOOL_HUGE_PAGES=0 turns it off."""
    if environ.get("MLXPOOL_HUGE_PAGES", "1") == "0" or HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    if thp_setting is None or "[never]" in thp_setting:
        return None  # no transparent huge pages here
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables}


def _reexec_with_huge_pages() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        with open(THP_SETTING) as f:
            setting: str | None = f.read()
    except OSError:
        setting = None
    env = huge_pages_env(dict(os.environ), setting)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _page_in_weights(argv: list[str]) -> None:
    """Start reading the served model's weights into the page cache before the agent's
    imports (seconds of them): see `mlxpool.agent.engine.pagein`. MLXPOOL_PAGE_IN=0: off."""
    from mlxpool.agent.engine import pagein

    model = pagein.model_argument(argv)
    if model is not None:
        pagein.start(model)


def usage() -> str:
    lines = ["usage: mlxpool COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "--version":
        from mlxpool import __version__

        print(__version__)
        return 0
    if name not in COMMANDS:
        print(f"mlxpool: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    if name == "agent" and rest[:1] in (["install"], ["uninstall"]):
        target = "mlxpool.agentinstall"  # the launchd service, not the agent process
    elif name == "agent" and from_command_line:
        _reexec_with_huge_pages()
        _page_in_weights(rest)
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
