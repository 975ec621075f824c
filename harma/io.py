"""File names and file writing shared by every layer; imports no model code.

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted
save never leaves a half-written checkpoint, index or cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .errors import HarmaError, one_line, unreadable

CONFIG_NAME = "adapter_config.json"  # an adapter directory's description (PEFT layout)
WEIGHTS_NAME = "adapter_model.safetensors"  # its trained tensors
INDEX_FILE = "index.json"  # an embedding index's description

PathLike = Union[str, Path]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints and run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    """``obj`` as JSON (with a final newline), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def arrays_key(arrays: Sequence[Any], settings: Any) -> str:
    """A short hash of the arrays' exact bytes (anything with ``tobytes()``) and the settings (JSON):
    names a result computed from them, such as a 2-D layout or a table of numbers."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:32]


def cached_json(path: Optional[PathLike], compute: Callable[[], Any]) -> Any:
    """The JSON at ``path``, or ``compute()`` written there atomically (folders created). An unreadable
    entry is recomputed; ``path=None`` only computes."""
    if path is None:
        return compute()
    path = Path(path)
    if path.is_file():
        try:
            return read_json(path, HarmaError)
        except HarmaError:
            pass
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(out).encode())
    return out


def parse_json(text: Union[str, bytes], error: type[Exception], where: object, line: Optional[int] = None) -> Any:
    """``text`` parsed as JSON. Invalid JSON, nesting deeper than the parser's recursion allows, an
    integer too long to convert and bytes that are not UTF-8 raise ``error`` naming ``where`` (a path)
    and, for one record of a JSON-lines file, its ``line``; never ``json``'s own ``ValueError`` or a
    ``RecursionError``."""
    at = where if line is None else f"{where}: line {line}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if line is not None:
            raise error(f"{at}, column {e.colno}: invalid JSON: {e.msg}") from None
        raise error(f"{at}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{at}: invalid JSON: nested too deeply to read") from None
    except ValueError as e:  # UnicodeDecodeError, an integer of more than 4300 digits
        raise error(f"{at}: invalid JSON: {one_line(e)[:200]}") from None


def read_json(path: PathLike, error: type[Exception]) -> Any:
    """The JSON in file ``path`` (the one JSON reader of the project: see :func:`parse_json`); a file
    that cannot be read raises ``error`` naming it too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(unreadable(path, e)) from None
    return parse_json(data, error, path)


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(h: "hashlib._Hash", paths: Sequence[PathLike]) -> "hashlib._Hash":
    """Feed each file's resolved path, size and modification time into ``h`` (no file is read): the
    identity of a file set used by the caches keyed on it. Returns ``h``."""
    for p in paths:
        st = os.stat(p)
        h.update(f"|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h


def folder_bytes(folder: PathLike) -> int:
    """Total size in bytes of the files under ``folder`` (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def read_safetensors(path: PathLike, error: type[HarmaError], keys: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The tensors of a safetensors file (only ``keys`` if given). A missing, truncated or foreign file
    raises ``error`` naming the path, never safetensors' own ``SafetensorError``."""
    from safetensors import SafetensorError, safe_open  # torch loads only when a file is read

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
    except (SafetensorError, OSError, KeyError) as e:
        raise error(f"{unreadable(path, e)}; not a complete safetensors file") from None


def safetensors_keys(path: PathLike, error: type[HarmaError]) -> list[str]:
    """The tensor names of a safetensors file, read from its header (``error`` as :func:`read_safetensors`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise error(f"{unreadable(path, e)}; not a complete safetensors file") from None
