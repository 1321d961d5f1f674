"""How a model turns a volume into outputs: a registry of methods by name.

A model card names its method (``"method": {"name": "single", "config": {...}}``; a card
without one is ``single``).  The pipeline looks the name up here — a card never names a
module to import, so a card from a stranger cannot run code.  Every method gets the volume on
the model's working grid and returns its outputs on that same grid; the pipeline resamples
them back to the input and derives the labels.

A method is a function ``run(context: MethodContext) -> MethodOutput`` registered with
``@register_method("name")``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..volume import TransferSegError, Volume

__all__ = ["METHODS", "MethodContext", "MethodOutput", "get_method", "register_method"]

METHODS: dict = {}


def register_method(name: str):
    """Function decorator: make a method available to model cards by ``name``."""

    def add(function: Callable):
        METHODS[name] = function
        return function

    return add


def get_method(name: str) -> Callable:
    _import_all()
    if name not in METHODS:
        raise TransferSegError(
            f"the model card names method {name!r}, which this version of TransferSeg does not have "
            f"(it has {', '.join(sorted(METHODS))}); update TransferSeg or use another model"
        )
    return METHODS[name]


@dataclass
class MethodContext:
    """What a method gets: the volume on the working grid (raw intensities: each component
    preprocesses as its spec says), the loaded model, the device and the run's callbacks."""

    volume: Volume
    model: object  # models.LoadedModel
    device: object  # torch.device
    progress: Optional[Callable] = None
    cancel: Optional[object] = None

    @property
    def card(self) -> dict:
        return self.model.card

    @property
    def task(self) -> str:
        return self.model.card.get("task", "segmentation")

    @property
    def num_classes(self) -> int:
        return len(self.model.card["labels"]) + 1 if self.task == "segmentation" else 1


@dataclass
class MethodOutput:
    """A method's outputs, all on the working grid.

    Segmentation: ``probabilities`` uint8 (K, k, j, i), probability × 255, and ``labels`` (the
    argmax of the unrounded probabilities, used as they are when no resampling is needed).
    Heatmap: ``heatmap`` float (k, j, i).  Multi-view methods add ``views`` (name → uint8
    probabilities) and ``disagreement``.
    """

    probabilities: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    heatmap: Optional[np.ndarray] = None
    views: dict = field(default_factory=dict)
    disagreement: Optional[np.ndarray] = None
    device: str = "cpu"
    fallbacks: list = field(default_factory=list)


def _import_all() -> None:
    from . import single  # noqa: F401  (registers "single")
