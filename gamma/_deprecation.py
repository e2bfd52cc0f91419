"""Old names kept as aliases: each warns once per process and still works."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

_warned: set[str] = set()


def warn_once(old: str, new: str, stacklevel: int = 3, category: type[Warning] = FutureWarning) -> None:
    """Warn (once per process for ``old``) that ``old`` is an old name of ``new``: a ``FutureWarning`` (shown to
    users) by default, a ``DeprecationWarning`` (shown to developers) for names only code compares."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} is an old name: use {new} (the old name still works)", category, stacklevel=stacklevel)


def renamed_options(options: dict[str, Any], renames: Mapping[str, str], where: str) -> dict[str, Any]:
    """``options`` with old keyword names replaced by their new ones (each warns once); both given is an error."""
    out = dict(options)
    for old, new in renames.items():
        if old not in out:
            continue
        value = out.pop(old)
        if out.get(new) is not None and value is not None:
            raise TypeError(f"{where}: pass {new}= only ({old}= is its old name)")
        warn_once(f"{where}({old}=...)", f"{new}=", stacklevel=4)
        if value is not None or new not in out:
            out[new] = value
    return out


class NativeKind(str):
    """The checkpoint kind ``"native"`` (gamma's own format), which also equals its old name ``"gamma"`` (warning
    once), so that code comparing ``ckpt.kind == "gamma"`` keeps working."""

    def __eq__(self, other: object) -> bool:
        if other == "gamma" and type(other) is str:
            warn_once('checkpoint kind "gamma"', '"native"', category=DeprecationWarning)
            return True
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__
