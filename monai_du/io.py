"""Files that a killed run cannot leave half written, and the marker that says a result is finished and for what.

- :func:`atomic_write`, :func:`write_text_atomic`: a reader, or a run killed mid-write, sees the previous file or the
  complete new one.
- :class:`DoneMarker`: a JSON file written last, beside a finished result, recording everything that shaped it (the
  inputs' content hashes, settings, versions). A result is reused only when the marker's inputs equal the current ones;
  otherwise :meth:`DoneMarker.changes` names what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "DoneMarker",
    "atomic_write",
    "file_digest",
    "fingerprint",
    "package_version",
    "remove_stale_temporaries",
    "write_text_atomic",
]


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file is flushed to disk and renamed over
    ``path`` with the permissions of a normal new file. When it fails, the temporary file is removed and ``path`` is
    left as it was.

    Example::

        with atomic_write("models/checkpoint.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` when its process was killed mid-write
    (``.<name>.<random>.tmp``). Call it only where no other process is writing into ``folder``.

    Returns:
        the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON types (paths and other objects as text), so that equal inputs give equal JSON."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value else "nan"
    return str(value)


def fingerprint(value: Any) -> str:
    """SHA-256 (hex) of ``value`` as canonical JSON (sorted keys)."""
    text = json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DoneMarker:
    """The marker of a finished result: a JSON file written last, recording the inputs that shaped it.

    Args:
        path: the marker file.
        inputs: everything the result depends on, as JSON-able values (content hashes of input files, settings,
            versions). Keys name the inputs in :meth:`changes`.

    Example::

        marker = DoneMarker(out / "done.json", {"manifest": file_digest(manifest), "epochs": 10})
        if not marker.is_done():
            build(out)
            marker.write()
    """

    FORMAT = "monai_du.done/1"

    def __init__(self, path: str | os.PathLike, inputs: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.inputs = _canonical(dict(inputs))
        self.key = fingerprint(self.inputs)

    def recorded(self) -> dict[str, Any] | None:
        """The marker's content, or None when there is no marker (or an unreadable one: the result is unfinished)."""
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return content if isinstance(content, dict) and content.get("format") == self.FORMAT else None

    def changes(self) -> list[str] | None:
        """None when nothing finished here; [] when the finished result has these inputs; else the input keys that
        differ (added, removed or changed)."""
        content = self.recorded()
        if content is None:
            return None
        if content.get("key") == self.key:
            return []
        old = content.get("inputs") if isinstance(content.get("inputs"), dict) else {}
        return sorted(k for k in set(old) | set(self.inputs) if old.get(k, None) != self.inputs.get(k, None)) or [
            "format"]

    def is_done(self) -> bool:
        """Whether a finished result with exactly these inputs is here."""
        return self.changes() == []

    def write(self, **extra: Any) -> Path:
        """Record the result as finished (atomically); ``extra`` is stored beside the inputs."""
        content = {"format": self.FORMAT, "key": self.key, "inputs": self.inputs, **_canonical(extra)}
        return write_text_atomic(self.path, json.dumps(content, indent=1, sort_keys=True) + "\n")

    def clear(self) -> None:
        """Remove the marker (the result is to be rebuilt)."""
        self.path.unlink(missing_ok=True)


def package_version() -> str:
    """``monai_du.__version__`` (the one place the version is written; the wheel's metadata reads it too): part of
    every key of a reusable result (runs, caches, prior tables, generated cohorts)."""
    import monai_du  # read at call time: the package sets __version__ after importing its modules

    return str(getattr(monai_du, "__version__", "unknown"))
