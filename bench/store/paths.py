"""Output paths, checked before any work starts: a bad folder fails in one line, not after a matrix ran."""
from __future__ import annotations

import errno
import os
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
