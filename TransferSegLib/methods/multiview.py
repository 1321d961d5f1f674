"""``multiview``: three 2D networks, one per anatomical view, fused into one segmentation
(the Volumetric Fusion Net, Xia et al. 2018).

The card's components ``axial``, ``coronal`` and ``sagittal`` are slice-stack 2D networks;
each runs over every slice of its view of the working grid (:func:`views.predict_view`) and
gives class probabilities on that grid.  They are fused by the card's ``method.config.fusion``
(overridable per run: ``transferseg segment --fusion``):

* ``vfn``: the ``fusion`` component, a VFN on the image and the three views' P(label ≥ c)
  (:func:`fusion.fusion_input`), with a sliding window of ``patch`` (64³) voxels and
  ``stride`` 32 inside the region of interest: the box of the majority vote's foreground
  (paper sec. 2.3), grown by ``roi_margin`` voxels (default 16, so the organ's border never
  lies at the box's edge; the VFN was trained on boxes grown by 32); outside it, background;
* ``vfn-noimage``: the ``fusion_noimage`` component, the paper's ablation without the image;
* ``majority``: :func:`fusion.majority_vote`;  ``staple``: :func:`fusion.staple`.

Besides the fused probabilities it returns each view's class probabilities, the views'
disagreement (:func:`fusion.view_disagreement`) and its summary inside the fused segmentation
(:func:`fusion.disagreement_summary`, on the working grid), and the time of the views and of
the fusion.
"""
from __future__ import annotations

import time

import numpy as np

from ..fusion import disagreement_summary, fusion_input, majority_vote, staple, view_disagreement
from ..inference import sliding_window_inference
from ..preprocessing import preprocess
from ..progress import StageProgress, check_cancel
from ..views import VIEWS, predict_view
from ..volume import TransferSegError
from .registry import MethodContext, MethodOutput, register_method

FUSIONS = {"vfn": "fusion", "vfn-noimage": "fusion_noimage", "majority": None, "staple": None}


def fusion_choices(components) -> list:
    """The fusions a model with these components can run."""
    return [name for name, needs in FUSIONS.items() if needs is None or needs in components]


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((num_classes,) + labels.shape, np.uint8)
    for c in range(num_classes):
        out[c][labels == c] = 255
    return out


def _box(mask: np.ndarray, margin: int):
    found = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(f.size == 0 for f in found):
        return None
    low = [max(0, int(f[0]) - margin) for f in found]
    high = [min(n, int(f[-1]) + 1 + margin) for f, n in zip(found, mask.shape)]
    return tuple(low) + tuple(high)


def predict_views(context: MethodContext, report=None) -> list:
    """The three views' class probabilities on the working grid: uint8 (K, k, j, i) each."""
    components = context.model.components
    missing = [view for view in VIEWS if view not in components]
    if missing:
        raise TransferSegError(f"method 'multiview' needs components {', '.join(VIEWS)}; {context.model.name} lacks "
                               f"{', '.join(missing)}")
    report = report or StageProgress(None)
    views = []
    for n, view in enumerate(VIEWS):
        component = components[view]
        image = preprocess(context.volume.array, component.spec.get("preprocessing"))
        batch = int((component.spec.get("inference") or {}).get("batch_size", 16))
        views.append(predict_view(component.network, image, context.volume.directions, view,
                                  num_classes=context.num_classes, batch_size=batch, device=context.device,
                                  cancel=context.cancel, progress=report.sub(n / 3, (n + 1) / 3)))
        del image
    return views


def fuse(context: MethodContext, views: list, fusion: str, report=None) -> tuple:
    """``(labels, uint8 probabilities, device, fallbacks)`` of ``fusion`` over the three views."""
    components = context.model.components
    choices = fusion_choices(components)
    if fusion not in choices:
        raise TransferSegError(f"fusion {fusion!r} is not available for {context.model.name}; choose one of "
                               f"{', '.join(choices)}")
    config = dict(context.model.method.get("config") or {})
    num_classes = context.num_classes
    if fusion == "majority":
        labels = majority_vote(views)
        return labels, _one_hot(labels, num_classes), str(context.device), []
    if fusion == "staple":
        labels, soft = staple(views)
        return labels, np.round(soft * 255.0).astype(np.uint8), str(context.device), []
    mv = majority_vote(views)
    box = _box(mv > 0, int(config.get("roi_margin", 16)))
    if box is None:  # no view found anything
        return mv, _one_hot(mv, num_classes), str(context.device), []
    component = components[FUSIONS[fusion]]
    image = preprocess(context.volume.array, components["axial"].spec.get("preprocessing"))
    inputs = fusion_input(image, views, include_image=fusion == "vfn")
    del image
    patch = tuple(config.get("patch") or component.spec["patch_size"])
    stride = int(config.get("stride", 32))
    result = sliding_window_inference(
        inputs, component.network, patch_size=patch, num_classes=num_classes,
        overlap=max(0.0, 1.0 - stride / max(patch)), blend=config.get("blend", "gaussian"),
        batch_size=int(config.get("batch_size", 2)), device=context.device, activation="softmax",
        return_probabilities=True, roi=box, progress=report, cancel=context.cancel)
    return result.labels, result.probabilities, str(result.device), list(result.fallbacks)


@register_method("multiview", options=("fusion",))
def run(context: MethodContext) -> MethodOutput:
    if context.task != "segmentation":
        raise TransferSegError("method 'multiview' segments; the model's task is " + repr(context.task))
    config = dict(context.model.method.get("config") or {})
    fusion = (context.options or {}).get("fusion") or config.get("fusion", "vfn")
    choices = fusion_choices(context.model.components)
    if fusion not in choices:  # before minutes of view inference
        raise TransferSegError(f"fusion {fusion!r} is not available for {context.model.name}; choose one of "
                               f"{', '.join(choices)}")
    report = StageProgress(context.progress)
    timings = {}
    tic = time.perf_counter()
    views = predict_views(context, report.sub(0.0, 0.85))
    timings["views"] = time.perf_counter() - tic
    check_cancel(context.cancel)

    tic = time.perf_counter()
    report(0.85, f"fusing ({fusion})")
    labels, probabilities, device, fallbacks = fuse(context, views, fusion, report.sub(0.86, 0.99))
    timings["fusion"] = time.perf_counter() - tic

    disagreement = view_disagreement(views, context.num_classes)
    summary = disagreement_summary(views, labels, disagreement)
    summary["fusion"] = fusion
    return MethodOutput(probabilities=probabilities, labels=labels, views=dict(zip(VIEWS, views)),
                        disagreement=disagreement, device=device, fallbacks=fallbacks, summary=summary,
                        timings=timings)
