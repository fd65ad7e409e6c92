"""Follow a routes.json file: the table source for use without Kubernetes.

The file is read every `interval` seconds (in a worker thread) and offered when its
bytes change. Polling rather than inotify: it is cheap for a file this small and it
sees the symlink swaps of mounted ConfigMap volumes, which inotify watches miss.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mlxpool.router.tables.holder import TableHolder

log = logging.getLogger(__name__)


async def follow_file(holder: TableHolder, path: Path, interval: float = 0.5) -> None:
    """Offer the file's table to `holder` now and whenever its content changes; runs until cancelled."""
    origin = f"file:{path}"
    last: bytes | None = None
    missing_logged = False
    while True:
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            if not missing_logged:
                log.warning("routes file not found, waiting for it path=%s", path)
                missing_logged = True
        except OSError as exc:
            log.warning("routes file unreadable path=%s error=%s", path, exc)
        else:
            missing_logged = False
            if content != last:
                last = content
                holder.offer_text(content.decode("utf-8", errors="replace"), origin)
        await asyncio.sleep(interval)
