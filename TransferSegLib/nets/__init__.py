"""Every network, operator and converter of TransferSeg.

``ARCHITECTURES`` maps the architecture name written in a model card to its class; every class
is built as ``cls(**config)`` so a card always says how to rebuild its network.
"""
from .registry import ARCHITECTURES, build_network, register  # noqa: F401  (first: the networks register here)
from .unet import *  # noqa: F401,F403
from .acs import *  # noqa
from .mcgcn import *  # noqa
from .ahnet import *  # noqa
from .convert import *  # noqa
from .vfn import *  # noqa
from .hdenseunet import *  # noqa  (with denseunet.py's networks)
from .specks import *  # noqa
