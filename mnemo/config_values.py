"""Numbers from text configs, cast to the dataclass field's declared type.

YAML 1.1 reads ``1e-4`` as a string (it wants ``1.0e-4``), and ``--set key=value`` overrides go through
YAML, so every config dataclass (run configs in ``training.config``, model configs in ``models.registry``)
casts its numeric fields here instead of failing later with ``'>' not supported between str and float``.
"""

from __future__ import annotations

from typing import Any

CASTS = {"float": float, "int": int}


def coerce(value: Any, type_name: str, where: str) -> Any:
    """``value`` as the field's type when that is ``float``/``int`` (optionally ``| None``); else as is."""
    cast = CASTS.get(type_name.removesuffix(" | None"))
    if value is None and type_name.endswith("| None"):
        return None
    if cast is None or (isinstance(value, cast) and not isinstance(value, bool)):
        return value
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {type_name}, got {value!r}") from None
