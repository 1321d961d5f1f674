"""Three views' predictions fused into one label map, and where the views disagree.

A multi-view method runs three 2D networks (axial, coronal and sagittal slices) over a CT
volume and brings their predictions back to one (k, j, i) grid.  The Volumetric Fusion Net
paper (Xia et al., "Bridging the gap between 2D and 3D organ segmentation with volumetric
fusion net", MICCAI 2018) compares its learned fusion with two baselines, both here::

    labels = majority_vote([axial, coronal, sagittal])           # uint8 (k, j, i)
    labels, probabilities = staple([axial, coronal, sagittal])   # + float32 (K, k, j, i)
    disagreement = view_disagreement([axial, coronal, sagittal]) # float32 (k, j, i) in [0, 1]
    summary = disagreement_summary(views, labels, disagreement)  # plain numbers for result.json

A view is any of: a label map (k, j, i) of whole numbers 0..K-1 (bool or integer); a binary
foreground probability (k, j, i), float in [0, 1]; class probabilities (K, k, j, i), float in
[0, 1] or uint8 (probability × 255).  The three views may come in different forms.

Choices, and why:

* **Nested labels.**  Labels 1..K-1 are nested regions "label ≥ c" (liver ≥ 1, tumor ≥ 2: a
  tumor lies inside the liver), so fusion works on the regions, not on label values: the
  majority vote keeps the largest c that at least two views reach, STAPLE runs once per
  region.  With three voters the nested majority is the median of the three labels.
* **STAPLE through SimpleITK** (Warfield et al. 2004), on binary uint8 masks (it rejects
  floats).  Its per-region probabilities are made monotone (p(≥ c) ≤ p(≥ c − 1)) before they
  become class probabilities, so that labels and probabilities say the same thing.
* **Disagreement** is the Jensen–Shannon divergence of the three views' class distributions,
  H(mean p) − mean H(p) in bits, divided by its maximum for three views, log2 3: 0 where the
  views give the same distribution, 1 where three one-hot views name three different classes.
* **Memory.**  Volumes reach ~200 × 512 × 512 voxels: the vote, the disagreement and the
  summary run slab by slab along k (at most :data:`_SLAB_VOXELS` float values at a time), so
  no float copy of a whole view, per class, is ever made.  STAPLE needs whole images.

numpy and SimpleITK only: no torch here.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .volume import TransferSegError, describe_shape

__all__ = ["cumulative_probabilities", "disagreement_summary", "fusion_input", "majority_vote", "staple",
           "view_disagreement", "view_labels", "view_probabilities"]

_SLAB_VOXELS = 1 << 22  # float values in one slab of all views and classes together (32 MiB as float64)
_LABELS, _BINARY, _CLASSES = "label map", "binary probability", "class probabilities"
_FORMS = ("a view is a (k, j, i) label map (bool or integer), a (k, j, i) foreground probability "
          "(float in [0, 1]) or (K, k, j, i) class probabilities (float in [0, 1] or uint8 × 255)")


# --- one view -------------------------------------------------------------------------------
def _slabs(depth: int, values_per_k: int):
    """Slices along k holding at most :data:`_SLAB_VOXELS` values (at least one k each)."""
    rows = max(1, _SLAB_VOXELS // max(int(values_per_k), 1))
    for k in range(0, depth, rows):
        yield slice(k, min(k + rows, depth))


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)) \
            or not 2 <= num_classes <= 256:
        raise TransferSegError(f"num_classes is a whole number from 2 (background and one region) to 256; "
                               f"got {num_classes!r}")
    return int(num_classes)


def _value_range(array: np.ndarray, axis_k: int):
    """(min, max) of ``array``, slab by slab along its k axis (NaN when it holds one)."""
    low, high = np.inf, -np.inf
    values_per_k = array.size // max(array.shape[axis_k], 1)
    for part in _slabs(array.shape[axis_k], values_per_k):
        slab = array[:, part] if axis_k == 1 else array[part]
        low, high = np.minimum(low, slab.min()), np.maximum(high, slab.max())  # these propagate NaN
    return low, high


def _check_view(view, name: str = "the view", num_classes=None):
    """``(array, form)`` of a valid view, its values checked; ``form`` is one of the three forms."""
    array = np.asarray(view)
    if array.dtype != bool and not (np.issubdtype(array.dtype, np.integer)
                                    or np.issubdtype(array.dtype, np.floating)):
        raise TransferSegError(f"{name} holds {array.dtype} values; {_FORMS}")
    if array.ndim not in (3, 4):
        raise TransferSegError(f"{name} is {array.ndim}D ({describe_shape(array.shape)}); {_FORMS}")
    if array.size == 0:
        raise TransferSegError(f"{name} has a zero-size axis ({describe_shape(array.shape)}); it holds no voxels")
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
    floating = np.issubdtype(array.dtype, np.floating)

    if array.ndim == 3 and not floating:
        form = _LABELS
        if array.dtype == bool:
            return array, form
        low, high = (int(v) for v in _value_range(array, 0))
        if low < 0:
            raise TransferSegError(f"{name} is a label map with negative values (min {low}); labels are 0..K-1")
        limit = (num_classes or 256) - 1
        if high > limit:
            raise TransferSegError(f"{name} is a label map with a value {high} above {limit}; labels are 0..K-1"
                                   + (f" with K = {num_classes} classes" if num_classes else " (at most 256 classes)"))
        return array, form

    if array.ndim == 4:
        form = _CLASSES
        if array.shape[0] < 2:
            raise TransferSegError(f"{name} has {array.shape[0]} class channel ({describe_shape(array.shape)}); "
                                   f"(K, k, j, i) class probabilities need K ≥ 2, background first")
        if num_classes is not None and array.shape[0] != num_classes:
            raise TransferSegError(f"{name} has {array.shape[0]} class channels ({describe_shape(array.shape)}) "
                                   f"but num_classes is {num_classes}")
        if array.dtype == np.uint8:
            return array, form
        if not floating:
            raise TransferSegError(f"{name} is a 4D {array.dtype} array; (K, k, j, i) class probabilities are "
                                   f"float in [0, 1] or uint8 (probability × 255)")
    else:
        form = _BINARY
    low, high = _value_range(array, 1 if array.ndim == 4 else 0)
    if np.isnan(low) or np.isnan(high):
        raise TransferSegError(f"{name} holds NaN (not-a-number) values; a probability is a number in [0, 1] "
                               f"(check the network's output)")
    if low < 0:
        raise TransferSegError(f"{name} is a float probability with negative values (min {low:g}); "
                               f"probabilities lie in [0, 1]")
    if high > 1:
        raise TransferSegError(f"{name} is a float probability with values above 1 (max {high:g}); probabilities "
                               f"lie in [0, 1]: pass a label map as integers (e.g. .astype(np.uint8)) and logits "
                               f"through a softmax first")
    return array, form


def _labels_of(array: np.ndarray, form: str, part: slice) -> np.ndarray:
    """uint8 labels of the k slab ``part`` of a checked view."""
    if form == _LABELS:
        return array[part].astype(np.uint8)
    if form == _BINARY:
        return (array[part] >= 0.5).astype(np.uint8)
    return np.argmax(array[:, part], axis=0).astype(np.uint8)  # ties go to the lower class


def _probabilities_of(array: np.ndarray, form: str, num_classes: int, part: slice, dtype=np.float32) -> np.ndarray:
    """(K, slab) class probabilities of the k slab ``part`` of a checked view."""
    if form == _LABELS:
        labels = array[part]
        return (labels[None] == np.arange(num_classes).reshape((-1,) + (1,) * labels.ndim)).astype(dtype)
    if form == _BINARY:
        if num_classes != 2:
            raise TransferSegError(f"a (k, j, i) float probability is a binary foreground probability (2 classes), "
                                   f"but num_classes is {num_classes}; pass ({num_classes}, k, j, i) class "
                                   f"probabilities or a label map")
        p = array[part].astype(dtype)
        return np.stack([1 - p, p])
    if array.shape[0] != num_classes:
        raise TransferSegError(f"a view has {array.shape[0]} class channels but num_classes is {num_classes}")
    if array.dtype == np.uint8:
        return array[:, part].astype(dtype) / dtype(255)
    return array[:, part].astype(dtype, copy=False)


def _spatial_shape(array: np.ndarray) -> tuple:
    return tuple(array.shape[-3:])


def _whole_labels(array: np.ndarray, form: str) -> np.ndarray:
    """uint8 labels of a whole checked view, made slab by slab."""
    labels = np.empty(_spatial_shape(array), np.uint8)
    for part in _slabs(labels.shape[0], array.size // labels.shape[0]):
        labels[part] = _labels_of(array, form, part)
    return labels


def _check_probability(value, name: str, zero_allowed: bool) -> float:
    number = value if isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, (bool, np.bool_)) else np.nan
    if not (0 <= number <= 1) or (number == 0 and not zero_allowed):
        raise TransferSegError(f"{name} is a number in {'[' if zero_allowed else '('}0, 1]; got {value!r}")
    return float(number)


def view_labels(view, num_classes=None) -> np.ndarray:
    """One view as a uint8 label map (k, j, i).

    A label map is used as it is (values 0..K-1); a (k, j, i) float probability becomes
    ``p ≥ 0.5``; (K, k, j, i) class probabilities become their argmax over classes (ties go to
    the lower class).  ``num_classes``, when given, is checked against the view.
    """
    return _whole_labels(*_check_view(view, num_classes=num_classes))


def view_probabilities(view, num_classes) -> np.ndarray:
    """One view as float32 class probabilities (K, k, j, i).

    A label map becomes one-hot; a (k, j, i) foreground probability ``p`` becomes
    ``[1 − p, p]`` (so ``num_classes`` must be 2); uint8 class probabilities are divided by 255;
    float class probabilities pass through (as float32: the same array when it already is).
    """
    num_classes = _check_num_classes(num_classes)
    array, form = _check_view(view, num_classes=num_classes)
    return _probabilities_of(array, form, num_classes, slice(None))


# --- three views ----------------------------------------------------------------------------
def _check_views(views, num_classes=None) -> list:
    """The three views checked, as ``(array, form)`` pairs on one spatial grid."""
    if isinstance(views, np.ndarray) or not isinstance(views, (list, tuple)):
        raise TransferSegError(f"views is a list of three views (axial, coronal, sagittal); got a "
                               f"{type(views).__name__}")
    if len(views) != 3:
        raise TransferSegError(f"got {len(views)} view{'s' if len(views) != 1 else ''}; fusion needs exactly three "
                               f"(axial, coronal, sagittal)")
    checked = [_check_view(view, f"view {n + 1} of 3", num_classes) for n, view in enumerate(views)]
    shapes = [_spatial_shape(array) for array, _ in checked]
    if len(set(shapes)) != 1:
        raise TransferSegError("the views' spatial shapes differ (" + ", ".join(describe_shape(s) for s in shapes)
                               + "); the three views must lie on the same (k, j, i) grid")
    return checked


def _infer_num_classes(checked, num_classes=None) -> int:
    """K given, or what the views imply: their class channels, else 2, or the largest label + 1."""
    if num_classes is not None:
        return _check_num_classes(num_classes)
    channels = sorted({array.shape[0] for array, form in checked if form == _CLASSES})
    if len(channels) > 1:
        raise TransferSegError(f"the views have different numbers of class channels ({channels}); "
                               f"they must predict the same classes")
    if channels:
        return channels[0]
    largest = max(int(_value_range(array, 0)[1]) if form == _LABELS else 1 for array, form in checked)
    return max(2, largest + 1)


def _views_per_k(checked) -> int:
    return sum(array.size // _spatial_shape(array)[0] for array, _ in checked)


def majority_vote(views) -> np.ndarray:
    """The nested majority of three views, uint8 (k, j, i).

    Label = the largest c such that at least two of the three views have label ≥ c (0 if
    none), which is the median of the three labels; for binary masks it is ``sum ≥ 2``.
    """
    checked = _check_views(views)
    shape = _spatial_shape(checked[0][0])
    fused = np.empty(shape, np.uint8)
    for part in _slabs(shape[0], _views_per_k(checked)):
        a, b, c = (_labels_of(array, form, part) for array, form in checked)
        fused[part] = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))  # median of three
    return fused


STAPLE_MAX_ITERATIONS = 50  # EM iterations per region; three voters converge in a handful


def staple(views, threshold: float = 0.5):
    """STAPLE fusion of three views, region by region: ``(labels uint8 (k, j, i), probabilities
    float32 (K, k, j, i))``.

    For each nested region c = 1..K-1, SimpleITK's STAPLE estimates p(label ≥ c) from the three
    binary masks (view label ≥ c).  The estimates are made monotone (p(≥ c) is the minimum over
    c' ≤ c), class probabilities are p(≥ c) − p(≥ c + 1), and the label is the largest c with
    p(≥ c) ≥ ``threshold``.  A region that is empty in all three views has probability 0, one
    that fills the volume in all three has 1 (STAPLE returns NaN for both); any other NaN
    becomes 0.
    """
    threshold = _check_probability(threshold, "the STAPLE threshold", zero_allowed=False)
    checked = _check_views(views)
    num_classes = _infer_num_classes(checked)
    labels = [_whole_labels(array, form) for array, form in checked]
    shape = labels[0].shape

    at_least = np.ones(shape, np.float32)  # p(label ≥ c), monotone in c
    probabilities = np.empty((num_classes,) + shape, np.float32)
    fused = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        masks = [(view >= c).astype(np.uint8) for view in labels]
        if not any(mask.any() for mask in masks):
            region = np.zeros(shape, np.float32)
        elif all(mask.all() for mask in masks):
            region = np.ones(shape, np.float32)
        else:
            staple_filter = sitk.STAPLEImageFilter()
            staple_filter.SetForegroundValue(1.0)
            staple_filter.SetMaximumIterations(STAPLE_MAX_ITERATIONS)  # its own convergence test can take minutes
            image = staple_filter.Execute([sitk.GetImageFromArray(mask) for mask in masks])
            region = sitk.GetArrayViewFromImage(image).astype(np.float32)
            del image
            region[np.isnan(region)] = 0
        del masks
        np.minimum(at_least, region, out=region)
        np.subtract(at_least, region, out=probabilities[c - 1])
        fused[region >= threshold] = c  # monotone, so a later c overwrites an earlier one
        at_least = region
    probabilities[num_classes - 1] = at_least
    np.clip(probabilities, 0, 1, out=probabilities)
    return fused, probabilities


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) over axis 0, with 0·log 0 = 0."""
    return -np.sum(p * np.log2(np.maximum(p, np.finfo(p.dtype).tiny)), axis=0)


def _disagreement_of(checked, num_classes: int, part: slice) -> np.ndarray:
    """Normalised Jensen–Shannon divergence of the three views on the k slab ``part``, float32."""
    p = np.stack([_probabilities_of(array, form, num_classes, part, np.float64) for array, form in checked])
    total = p.sum(axis=1, keepdims=True)
    np.divide(p, total, out=p, where=total > 0)  # uint8 rounding leaves sums of 254/255..256/255
    divergence = _entropy_bits(p.mean(axis=0)) - _entropy_bits(np.moveaxis(p, 1, 0)).mean(axis=0)
    divergence /= np.log2(3.0)
    same = np.all((p[0] == p[1]) & (p[1] == p[2]), axis=0)
    divergence[same] = 0  # exactly 0, whatever the round-off of the mean
    return np.clip(divergence, 0, 1).astype(np.float32)


def view_disagreement(views, num_classes=None) -> np.ndarray:
    """Where the three views disagree, float32 (k, j, i) in [0, 1].

    The Jensen–Shannon divergence of the views' class distributions, H(mean p) − mean H(p) in
    bits, divided by log2 3 (its maximum for three views).  It is 0 where the three
    distributions are equal; for one-hot views, 1 where they name three classes and
    H(2/3, 1/3) / log2 3 ≈ 0.579 where two agree.  Each view's distribution is divided by its
    sum first (uint8 probabilities rarely sum to exactly 1).  ``num_classes`` defaults to what
    the views imply (their class channels, 2 for a foreground probability, else the largest
    label + 1).
    """
    checked = _check_views(views, num_classes)
    num_classes = _infer_num_classes(checked, num_classes)
    shape = _spatial_shape(checked[0][0])
    disagreement = np.empty(shape, np.float32)
    for part in _slabs(shape[0], 3 * num_classes * shape[1] * shape[2]):
        disagreement[part] = _disagreement_of(checked, num_classes, part)
    return disagreement


def disagreement_summary(views, fused_labels, disagreement=None, threshold: float = 0.5) -> dict:
    """How much the views disagree inside the fused segmentation (``fused_labels > 0``).

    Returns plain numbers (JSON-ready): ``fused_voxels``; ``share_views_differ``, the fraction
    of those voxels where the views' labels (:func:`view_labels`) are not all equal;
    ``mean_disagreement`` (of :func:`view_disagreement`, computed here when not given);
    ``share_disagreement_above``, the fraction with disagreement > ``threshold``;
    ``threshold``; and ``per_label``: for each label c ≥ 1 present, ``{"voxels",
    "share_views_differ"}`` under ``str(c)``.  An empty segmentation gives zeros.
    """
    threshold = _check_probability(threshold, "the disagreement threshold", zero_allowed=True)
    checked = _check_views(views)
    shape = _spatial_shape(checked[0][0])
    fused_labels = np.asarray(fused_labels)
    if not (fused_labels.dtype == bool or np.issubdtype(fused_labels.dtype, np.integer)):
        raise TransferSegError(f"the fused segmentation is a label map of whole numbers; got {fused_labels.dtype}")
    if fused_labels.shape != shape:
        raise TransferSegError(f"the fused segmentation is {describe_shape(fused_labels.shape)} but the views are "
                               f"{describe_shape(shape)}; they must lie on the same (k, j, i) grid")
    if disagreement is not None:
        disagreement = np.asarray(disagreement)
        if disagreement.shape != shape:
            raise TransferSegError(f"the disagreement map is {describe_shape(disagreement.shape)} but the views are "
                                   f"{describe_shape(shape)}; pass view_disagreement(views) or None")
        num_classes = None
    else:
        num_classes = _infer_num_classes(checked)

    voxels = np.zeros(1, np.int64)  # per fused label
    differ = np.zeros(1, np.int64)
    disagreement_sum, above = 0.0, 0
    per_k = _views_per_k(checked) + (3 * num_classes * shape[1] * shape[2] if num_classes else 0)
    for part in _slabs(shape[0], per_k):
        fused = fused_labels[part]
        if fused.dtype != bool and fused.size and fused.min() < 0:
            raise TransferSegError("the fused segmentation has negative labels; labels are 0..K-1")
        a, b, c = (_labels_of(array, form, part) for array, form in checked)
        inside = fused > 0
        views_differ = ((a != b) | (b != c)) & inside
        counts = np.bincount(fused[inside].ravel().astype(np.int64), minlength=voxels.size)
        counts_differ = np.bincount(fused[views_differ].ravel().astype(np.int64), minlength=counts.size)
        voxels = np.pad(voxels, (0, counts.size - voxels.size)) + counts
        differ = np.pad(differ, (0, counts_differ.size - differ.size)) + counts_differ
        values = (disagreement[part] if disagreement is not None
                  else _disagreement_of(checked, num_classes, part))[inside]
        disagreement_sum += float(values.sum(dtype=np.float64))
        above += int(np.count_nonzero(values > threshold))

    total = int(voxels.sum())
    share = (lambda n: float(n) / total) if total else (lambda n: 0.0)
    return {
        "fused_voxels": total,
        "share_views_differ": share(differ.sum()),
        "mean_disagreement": share(disagreement_sum),
        "share_disagreement_above": share(above),
        "threshold": float(threshold),
        "per_label": {str(c): {"voxels": int(voxels[c]), "share_views_differ": float(differ[c]) / int(voxels[c])}
                      for c in range(1, voxels.size) if voxels[c] > 0},
    }


def cumulative_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Class probabilities (K, …), uint8 × 255 or float, as float32 P(label ≥ c) for c = 1 … K − 1:
    the nested regions a fusion network sees (liver or tumor, tumor)."""
    p = np.asarray(probabilities)
    p = p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p.astype(np.float32)
    return np.clip(np.cumsum(p[::-1], axis=0)[::-1][1:], 0.0, 1.0)


def fusion_input(image: np.ndarray, views, include_image: bool = True) -> np.ndarray:
    """The Volumetric Fusion Net's input (paper sec. 2.2): the image, then per view (axial,
    coronal, sagittal) its P(label ≥ c), c = 1 … K − 1, every channel in [0, 1]; float32
    (1 + 3 (K − 1), k, j, i), or without the image channel for the paper's ablation.
    ``image`` is the preprocessed image (clipped to [0, 1] here); ``views`` are the three views'
    class probabilities (K, k, j, i)."""
    views = list(views)
    if len(views) != 3:
        raise TransferSegError(f"got {len(views)} views; the fusion input needs three (axial, coronal, sagittal)")
    image = np.asarray(image)
    for n, view in enumerate(views):
        if np.ndim(view) != 4 or np.shape(view)[1:] != image.shape:
            raise TransferSegError(f"view {n + 1} of 3 has shape {np.shape(view)}; the fusion input needs class "
                                   f"probabilities (K, {', '.join(str(s) for s in image.shape)})")
    channels = [np.clip(image, 0.0, 1.0).astype(np.float32)[None]] if include_image else []
    channels += [cumulative_probabilities(view) for view in views]
    return np.concatenate(channels)
