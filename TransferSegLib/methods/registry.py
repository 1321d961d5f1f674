"""The methods a model card can name (``METHODS``, filled by each method module's ``@register_method``
when :mod:`TransferSegLib.methods` is imported, which any import of this module does first), and
what a method gets and returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..volume import TransferSegError, Volume

__all__ = ["METHODS", "MethodContext", "MethodOutput", "check_options", "get_method", "register_method"]

METHODS: dict = {}
OPTIONS: dict = {}  # method name -> the per-run options it takes


def register_method(name: str, options=()):
    """Function decorator: make a method available to model cards by ``name``; ``options`` are
    the per-run choices it reads from ``MethodContext.options`` (e.g. ``("fusion",)``)."""

    def add(function: Callable):
        METHODS[name] = function
        OPTIONS[name] = tuple(options)
        return function

    return add


def check_options(name: str, options: dict, model_name: str = "the model") -> None:
    """A clear error for a per-run option the model's method does not take."""
    unknown = sorted(set(options or {}) - set(OPTIONS.get(name, ())))
    if unknown:
        takes = ", ".join(OPTIONS.get(name, ())) or "none"
        raise TransferSegError(f"{', '.join('--' + u for u in unknown)} does not apply to {model_name}: its method "
                               f"{name!r} takes {takes}")


def get_method(name: str) -> Callable:
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
    options: dict = field(default_factory=dict)  # per-run choices, e.g. {"fusion": "staple"}
    # the volume at its own resolution (oriented like ``volume``, before resampling), for a stage
    # that needs every voxel (calcification specks); None where the caller has only the working grid
    native: Optional[Volume] = None

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
    probabilities) and ``disagreement``.  ``summary`` goes into result.json (e.g. the views'
    disagreement inside the segmentation); ``timings`` (part → seconds) into the run's timings.
    """

    probabilities: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    heatmap: Optional[np.ndarray] = None
    views: dict = field(default_factory=dict)
    disagreement: Optional[np.ndarray] = None
    device: str = "cpu"
    fallbacks: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    # labels from probabilities (K, …) on a 0…255 scale, where a method's rule is not the argmax
    # (e.g. the cascade's nested thresholds); used again on the input grid after resampling
    decide: Optional[Callable] = None
    # heatmap task: detections on the working grid (None: the pipeline finds the heatmap's peaks with
    # the card's "peaks" settings) and detections found on the native grid (context.native)
    detections: Optional[list] = None
    native_detections: list = field(default_factory=list)
