"""Every network, operator and converter of TransferSeg.

``ARCHITECTURES`` maps the architecture name written in a model card to its class; every class
is built as ``cls(**config)`` so a card always says how to rebuild its network.
"""
from __future__ import annotations

from ..volume import TransferSegError

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
    _import_all()
    if name not in ARCHITECTURES:
        raise TransferSegError(
            f"unknown architecture {name!r}; this version of TransferSeg knows {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        return ARCHITECTURES[name](**(config or {}))
    except TypeError as e:
        raise TransferSegError(f"architecture {name!r} cannot be built from config {config}: {e}") from None


def _import_all() -> None:
    from . import unet  # noqa: F401  (registers its architectures)
    from . import mcgcn  # noqa: F401
    from . import ahnet  # noqa: F401
    from . import vfn  # noqa: F401
    from . import hdenseunet  # noqa: F401  (registers denseunet2d, denseunet3d and hdenseunet)
    from . import convert  # noqa: F401  (registers converted)


from .unet import *  # noqa: F401,F403,E402
from .acs import *  # noqa
from .mcgcn import *  # noqa
from .ahnet import *  # noqa
from .convert import *  # noqa
from .vfn import *  # noqa
from .hdenseunet import *  # noqa  (with denseunet.py's networks)
