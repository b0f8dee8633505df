"""Data-parallel world size. Reserved: the DDP launcher is not built yet, so only 1 is accepted."""
from __future__ import annotations

from typing import Any

from bench.spec import Trick
from bench.tricks import register


@register
class WorldSize(Trick):
    name = "world_size"
    description = "number of data-parallel processes (reserved: DDP support is not built yet)"
    values_help = "1 (DDP world sizes > 1 are not supported yet)"
    default = 1

    @classmethod
    def parse(cls, value: Any) -> Any:
        if value != 1 or isinstance(value, bool):
            raise ValueError(
                f"{value!r} is not supported: world_size is reserved for DDP, which trickbench "
                "does not run yet; remove the axis or set it to 1"
            )
        return value
