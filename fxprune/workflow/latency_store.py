"""Cost tables of the latency search kept on disk, so that a second prune on the same machine is fast.

:class:`JsonFileStore` implements :class:`fxprune.latency_model.CostStore`: one JSON file per
table key (device name and type, dtype, threads, channels_last, torch version, table format),
named by a hash of the key, holding the key itself and the entries (``layer key|c_in|c_out``
-> ms, the layer key holding the shapes). A file whose recorded key differs from the one asked
for (a hash collision, a hand-edited file) or that is not a valid table is ignored with a
warning, never trusted; files are written atomically (a temporary sibling, then a rename), and
only files this store wrote are ever replaced.

The command line uses :func:`default_cache_dir` (``$FXPRUNE_CACHE`` or ``~/.cache/fxprune``,
``latency/`` below it) unless a run names another folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from fxprune.latency_model import key_digest

__all__ = ["JsonFileStore", "default_cache_dir", "STORE_FORMAT"]

logger = logging.getLogger("fxprune.workflow")

#: Written into every file; a file of another format is ignored.
STORE_FORMAT = "fxprune-latency-table-1"


def default_cache_dir() -> Path:
    """Where the CLI keeps latency tables: ``$FXPRUNE_CACHE/latency`` or ``~/.cache/fxprune/latency``."""
    root = os.environ.get("FXPRUNE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "fxprune"
    return base / "latency"


class JsonFileStore:
    """One JSON file per cost-table key under ``folder`` (created on first save)."""

    def __init__(self, folder: Union[str, Path]) -> None:
        self.folder = Path(folder)

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.folder / f"latency-{key_digest(key)}.json"

    def load(self, key: Mapping[str, Any]) -> Optional[Dict[str, float]]:
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("latency table %s is unreadable (%s); measuring afresh", path, exc)
            return None
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT or data.get("key") != dict(key):
            logger.warning("latency table %s is not the table for this device/settings; measuring afresh", path)
            return None
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return None
        out: Dict[str, float] = {}
        for name, value in entries.items():
            if isinstance(name, str) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value) and value >= 0:
                out[name] = float(value)
        return out

    def save(self, key: Mapping[str, Any], entries: Mapping[str, float]) -> None:
        path = self.path(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": STORE_FORMAT, "key": dict(key), "entries": dict(sorted(entries.items()))},
                          indent=1) + "\n"
        # A temporary sibling and a rename: a reader never sees half a table, a crash leaves the old one.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)  # ours: made above
            except OSError:
                pass
            raise
