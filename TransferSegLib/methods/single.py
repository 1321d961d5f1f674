"""``single``: one network over the whole volume with the sliding-window inferer.

The card's one component (``network`` for a card without ``method``) says how: its
``preprocessing``, ``patch_size`` (or ``inference.patch_size``: a fully convolutional network
can run larger windows than it was trained on, with fewer overlaps), and ``inference``
settings (overlap, blend, batch_size, activation).
"""
from __future__ import annotations

from ..inference import sliding_window_inference
from ..preprocessing import preprocess
from ..volume import TransferSegError
from .registry import MethodContext, MethodOutput, register_method


def run_component(context: MethodContext, component, array=None, progress=None) -> object:
    """One component's network over ``array`` (default: the context's volume, preprocessed as
    the component says); returns the inferer's result with probabilities."""
    spec = component.spec
    if array is None:
        array = preprocess(context.volume.array, spec.get("preprocessing"))
    settings = dict(spec.get("inference") or {})
    segmentation = context.task == "segmentation"
    return sliding_window_inference(
        array, component.network, patch_size=tuple(settings.get("patch_size") or spec["patch_size"]),
        num_classes=context.num_classes,
        overlap=settings.get("overlap", 0.5), blend=settings.get("blend", "gaussian"),
        batch_size=settings.get("batch_size", 2), device=context.device,
        activation=settings.get("activation", "softmax" if segmentation else "none"),
        return_probabilities=segmentation, progress=progress or context.progress, cancel=context.cancel,
    )


@register_method("single")
def run(context: MethodContext) -> MethodOutput:
    components = context.model.components
    if len(components) != 1:
        raise TransferSegError(f"method 'single' runs one network; {context.model.name} has components "
                               f"{', '.join(components)}")
    result = run_component(context, next(iter(components.values())))
    return MethodOutput(probabilities=result.probabilities, labels=result.labels, heatmap=result.heatmap,
                        device=str(result.device), fallbacks=list(result.fallbacks))
