"""The one kind of user error, and text that never grows with what it quotes."""
from __future__ import annotations

from pathlib import Path


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: no message grows with what it quotes."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ConfigError(Exception):
    """Bad user input: ``file: key.path: message``."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key, self.message = str(file), key, message
        where = f"{clip(self.file, 100)}: {clip(key, 100)}: " if key else f"{clip(self.file, 100)}: "
        super().__init__(clip(where + message, MAX_ERROR_CHARS))


MAX_ERROR_CHARS = 290  # one readable line, whatever the input; values inside are shortened further
