"""Output files written whole or not at all (tables, reports, plots of the benchmark and reproduction scripts)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: str | bytes | Callable[[str], None]) -> None:
    """Write `path` through a temporary file in its folder (created if needed), then rename it into place, so a failed
    run never leaves half a file. `data` is the text or bytes, or a function that writes the temporary path it is given
    (e.g. `lambda tmp: fig.savefig(tmp, format="png")`). The file gets the permissions of any new file (the umask
    applied), not the temporary file's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if callable(data):
            data(temporary)
        elif isinstance(data, bytes):
            Path(temporary).write_bytes(data)
        else:
            Path(temporary).write_text(data, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
