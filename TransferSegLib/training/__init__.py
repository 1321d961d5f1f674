"""Training: the one trainer (:mod:`.trainer`, every stage of every method, resumable, under
torchrun) and the recipes that train several models into one (:mod:`.recipes`, e.g. the
multi-view networks and their fusion net with cross-cross-augmentation).

``python -m TransferSegLib.training CONFIG.json -o OUT`` (or ``transferseg train``) runs a
trainer config, or a recipe config (one with a ``"recipe"`` key).
"""
from .trainer import *  # noqa: F401,F403
from .trainer import _build_network  # noqa: F401  (tests build a config's network)
