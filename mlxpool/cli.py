"""The `mlxpool` command: one entry point dispatching to each component.

Each component owns its own argument parsing (`main(argv) -> int`), so this module
stays a thin table and imports a component only when it is asked for: `mlxpool
router` never pays for importing MLX.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("mlxpool.dev.local:main_up", "agents + router on loopback, no Kubernetes: a first look in seconds"),
    "down": ("mlxpool.dev.local:main_down", "stop what `mlxpool up` started"),
    "agent": ("mlxpool.agent.main", "run a node agent serving models with MLX (install|uninstall: launchd)"),
    "router": ("mlxpool.router.main", "run a router following a pool's routing table"),
    "operator": ("mlxpool.operator.main", "run the kopf operator"),
    "dev": ("mlxpool.dev.main", "local control plane + operator + agents + router (up|down|status)"),
    "model": ("mlxpool.tinymodel", "make-tiny PATH: make a small random Llama model with a real tokenizer"),
}


def usage() -> str:
    lines = ["usage: mlxpool COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
