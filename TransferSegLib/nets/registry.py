"""The architectures a model card can name: ``ARCHITECTURES`` (name → class), filled by each network
module's ``@register`` when :mod:`TransferSegLib.nets` is imported (which any import of this module
does first), and :func:`build_network`."""
from __future__ import annotations

from ..volume import TransferSegError

__all__ = ["ARCHITECTURES", "build_network", "register"]

ARCHITECTURES: dict = {}


def register(name: str):
    """Class decorator: make an architecture buildable from a model card by ``name``."""

    def add(cls):
        ARCHITECTURES[name] = cls
        cls.architecture_name = name
        return cls

    return add


def build_network(name: str, config: dict | None = None):
    """Instantiate the architecture ``name`` with keyword ``config``; clear error if unknown."""
    if name not in ARCHITECTURES:
        raise TransferSegError(
            f"unknown architecture {name!r}; this version of TransferSeg knows {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        return ARCHITECTURES[name](**(config or {}))
    except TypeError as e:
        raise TransferSegError(f"architecture {name!r} cannot be built from config {config}: {e}") from None
