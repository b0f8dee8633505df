"""The one reader of JSON inputs and the one writer of output files.

Reading (:func:`read_json`, :func:`read_limited`): every JSON file trickbench is handed or finds
(a baseline, pytest-benchmark results, ``matrix.json``, per-run files, ``jobs.json``) goes
through here. A path that is not a regular file is refused before it is opened (a FIFO would
block the reader, ``/dev/zero`` would fill memory), the bytes read are bounded, and the JSON must
be UTF-8, finite (no ``NaN``/``Infinity``, which Python's json accepts and every statistic then
spreads) and shallow. Each refusal is one :class:`StoreError` line naming the file.

Writing (:func:`write_atomic`, :func:`make_folder`): never through a symbolic link, neither at the
file's name nor at a folder between the output folder and the file; always to a temporary name
then renamed, so a reader (or a kill, or a full disk) sees the old file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Optional

MAX_JSON_BYTES = 64 << 20  # a baseline or a pytest-benchmark file of every round is a few MiB
MAX_JSON_DEPTH = 64  # trickbench's own files nest about 6 deep; pytest-benchmark's about 8
READ_CHUNK = 1 << 20


class StoreError(Exception):
    """A file or folder that cannot be used as it is (a link, not a regular file, unreadable,
    malformed, unwritable): one line."""


# --- reading -------------------------------------------------------------------------------------------

def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _refuse_irregular(path: Path, mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise StoreError(f"{path}: is {file_kind(mode)}, not a {what}; give a regular file")


def read_limited(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; StoreError for anything else.

    The type is checked on the name before opening (``open`` of a FIFO blocks until a writer
    comes) and again on the opened descriptor (O_NONBLOCK, so a FIFO swapped in between cannot
    block either); the read stops at ``limit`` whatever the file's size claims (procfs says 0)."""
    path = Path(path)
    try:
        _refuse_irregular(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read: {err.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        _refuse_irregular(path, os.fstat(fd).st_mode, what)
        if os.fstat(fd).st_size > limit:
            raise StoreError(f"{path}: {os.fstat(fd).st_size:,} bytes, larger than {limit >> 20} MiB "
                             f"(the most a {what} may hold)")
        chunks, size = [], 0
        while chunk := handle.read(min(READ_CHUNK, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise StoreError(f"{path}: larger than {limit >> 20} MiB (the most a {what} may hold)")
    return b"".join(chunks)


class _NotFinite(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise _NotFinite(token)


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are distinct: json keeps the last of two silently (a baseline's
    duplicated cell would vanish), so a duplicate is refused, as the matrix YAML refuses one."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotFinite(text if len(text) <= 20 else text[:17] + "...")
    return value


def json_depth(value: Any) -> int:
    """How deep containers nest in ``value`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(data: bytes, path: str | Path, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON of ``data`` (read from ``path``): UTF-8, finite numbers, at most ``max_depth`` deep."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StoreError(f"{path}: not UTF-8 text (byte {err.start}); not a {what}") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_keys)
    except _Duplicate as err:
        raise StoreError(f"{path}: duplicate key {str(err)[:60]!r} in one object (JSON would keep only the "
                         f"last); not a {what}") from None
    except _NotFinite as err:
        raise StoreError(f"{path}: holds {err}, which is not a finite number; a {what} holds finite numbers "
                         "only") from None
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                         f"not a {what}") from None
    except RecursionError:
        raise StoreError(f"{path}: nested too deeply (more than {max_depth} levels); not a {what}") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise StoreError(f"{path}: {str(err)[:80]}; not a {what}") from None
    if json_depth(value) > max_depth:
        raise StoreError(f"{path}: nested too deeply (more than {max_depth} levels); not a {what}")
    return value


def read_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file's value, read by the rules of :func:`read_limited` and :func:`parse_json`;
    ``what`` names the kind of file in the messages (e.g. "baseline file")."""
    return parse_json(read_limited(path, what, limit), path, what, max_depth)


def read_optional_json(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> Optional[Any]:
    """:func:`read_json`, or None when nothing exists at ``path`` (a link to nothing is refused)."""
    if not os.path.lexists(path):
        return None
    return read_json(path, what, limit)


# --- writing without following links --------------------------------------------------------------------

def refuse_link(path: Path) -> None:
    """StoreError if ``path`` is a link or exists as something other than a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise StoreError(f"{path} is a symbolic link; trickbench does not write through links: remove the link")
    if not stat.S_ISREG(mode):
        raise StoreError(f"{path} is not a regular file; remove it")


def refuse_linked_folders(path: Path, root: Optional[Path]) -> None:
    """StoreError if a folder between ``root`` (excluded: the output folder the user named may
    be a link) and ``path`` (excluded) is a link or not a folder. Nothing to check without ``root``."""
    if root is None:
        return
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        inside = path.parent.relative_to(root)
    except ValueError:
        return  # not under root: only the file's own name is checked
    folder = root
    for part in inside.parts:
        folder = folder / part
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            return  # what follows will be created
        if stat.S_ISLNK(mode):
            raise StoreError(f"{folder} is a symbolic link; trickbench does not write through links: "
                             "remove the link")
        if not stat.S_ISDIR(mode):
            raise StoreError(f"{folder} is {file_kind(mode)}, not a folder; remove it")


def make_folder(path: Path, root: Optional[Path] = None) -> Path:
    """``mkdir -p`` that refuses a link or a file anywhere between ``root`` and ``path`` (included)."""
    path = Path(path)
    refuse_linked_folders(path / "x", root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"{path}: not a folder (a file is in the way)") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot create the folder: {err.strerror}") from None
    return path


def open_for_writing(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link (O_NOFOLLOW) and anything but a regular file;
    O_NONBLOCK so that a FIFO planted under the name cannot block the run."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise _store_error(path, err) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{path} is not a regular file; remove it")
    return fd


def _store_error(path: Path, err: OSError) -> StoreError:
    try:
        refuse_link(path)
    except StoreError as refused:
        return refused
    return StoreError(f"{path}: cannot write: {err.strerror}")


def write_atomic(path: Path, data: str | bytes, root: Optional[Path] = None) -> None:
    """Replace ``path`` whole (a reader sees the old file or the new one), through a temporary
    name created exclusively, so a link planted at either name is never written through; with
    ``root`` (the output folder), no folder between it and ``path`` may be a link either. On any
    failure (a full disk, a signal) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    refuse_linked_folders(path, root)
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)  # ours, left by a killed process of the same pid; unlink never follows
    fd = open_for_writing(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise StoreError(f"{path}: cannot write: {err.strerror or err}") from None
        raise
