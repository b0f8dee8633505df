"""Output paths, checked before any work starts: a bad folder fails in one line, not after a matrix ran."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from bench.base.errors import ConfigError
from bench.base.safeyaml import shorten


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written, without creating anything."""
    where = f"{flag} {shorten(str(path), 80)}"
    absolute = Path(os.path.abspath(path))
    if len(os.fsencode(str(absolute))) >= os.pathconf("/", "PC_PATH_MAX"):
        raise ConfigError("arguments", where, "path is longer than the filesystem allows")
    existing = Path(absolute.anchor)  # the deepest folder of the path that exists
    created = False
    for part in absolute.parts[1:]:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        if len(os.fsencode(part)) > name_max:
            raise ConfigError("arguments", where, f"a name of {len(os.fsencode(part))} bytes is longer than "
                              f"the filesystem allows ({name_max})")
        candidate = existing / part
        if created or not os.path.lexists(candidate):
            created = True  # from here on the folders would be created
        elif not candidate.is_dir():
            problem = "exists and is not a folder" if candidate == absolute else \
                f"{shorten(str(candidate), 80)} is a file, not a folder"
            raise ConfigError("arguments", where, problem)
        else:
            existing = candidate
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("arguments", where, f"{shorten(str(existing), 80)} is not writable "
                          f"({os.strerror(errno.EACCES).lower()})")


def check_out_file(path: str | Path, flag: str) -> None:
    """Refuse an output file that cannot be written whole, without writing anything: a folder, a
    link or another non-regular file at the name, a folder that does not exist or is not
    writable (the file is written beside itself and renamed, so its folder must take a new name)."""
    where = f"{flag} {shorten(str(path), 80)}"
    absolute = Path(os.path.abspath(path))
    if not absolute.name or len(os.fsencode(str(absolute))) >= os.pathconf("/", "PC_PATH_MAX"):
        raise ConfigError("arguments", where, "not a file name, or a path longer than the filesystem allows")
    folder = absolute.parent
    name_max = os.pathconf(folder if folder.is_dir() else "/", "PC_NAME_MAX")
    if len(os.fsencode(absolute.name)) + len(".tmp.") + 12 > name_max:  # the temporary name is longer
        raise ConfigError("arguments", where, f"a file name longer than the filesystem allows ({name_max} bytes)")
    try:
        mode = os.lstat(absolute).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise ConfigError("arguments", where, f"cannot be written: {err.strerror}") from None
    if mode is not None and stat.S_ISLNK(mode):
        raise ConfigError("arguments", where, "is a symbolic link; trickbench does not write through links")
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError("arguments", where, f"is {kind}; give a file name")
    if not folder.is_dir():
        raise ConfigError("arguments", where, "its folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError("arguments", where, f"its folder is not writable ({os.strerror(errno.EACCES).lower()})")
    probe = folder / f".{absolute.name}.{os.getpid()}.probe"
    try:  # what access() cannot tell (root, a read-only mount, procfs): create the name and remove it
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise ConfigError("arguments", where, f"its folder does not take a new file ({err.strerror})") from None


def check_out_files(**flags: str | Path | None) -> None:
    """:func:`check_out_file` for each given ``--flag=path`` (None: not asked for); two flags
    naming the same file are refused, as the second write would replace the first."""
    seen: dict[str, str] = {}
    for flag, path in flags.items():
        if path is None:
            continue
        name = "--" + flag.replace("_", "-")
        check_out_file(path, name)
        key = os.path.realpath(path)
        if key in seen:
            raise ConfigError("arguments", f"{name} {shorten(str(path), 80)}", f"is also {seen[key]}'s file; "
                              "give each output its own file")
        seen[key] = name
