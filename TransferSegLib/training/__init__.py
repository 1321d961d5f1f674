"""Training: the one trainer (:mod:`.trainer`, every stage of every method, resumable, under
torchrun) and the recipes that train several models into one (:mod:`.recipes`, e.g. the
multi-view networks and their fusion net with cross-cross-augmentation).

The trainer's parts: :mod:`.config` (the config checked whole), :mod:`.sampling` (cases on their
working grid, patches), :mod:`.networks` (the network and the weights it starts from),
:mod:`.optim` (parameter groups, optimizers, schedules, loss switches), :mod:`.checkpoints`,
:mod:`.logs`; :mod:`.trainer` runs the loop; :mod:`.entry` reads a config (trainer or recipe) and
is the command line.

``python -m TransferSegLib.training CONFIG.json -o OUT`` (or ``transferseg train``) runs a
trainer config, or a recipe config (one with a ``"recipe"`` key).
"""
from .entry import load_config, main  # noqa: F401
from .trainer import *  # noqa: F401,F403
from .trainer import network_from_config  # noqa: F401  (tests build a config's network)
