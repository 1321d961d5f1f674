"""Is this scan the model's?  Checks of the input before the network runs and of the result after,
from the card's ``expects``.

A liver model asked to read a head must say so, never return a confident liver tumor.  A card
states what its model expects::

    "expects": {
      "modality": "CT",                        # intensities in Hounsfield units
      "region": "the upper abdomen",           # said in the messages
      "organ": {"name": "liver", "labels": [1, 2], "min_ml": 150, "min_ml_per_cm": 20,
                "min_body_cm2": 300, "side": "right", "min_offset_mm": 20},
      "lesion": {"name": "liver tumor", "label": 2, "max_fraction": 0.5}
    }

* :func:`check_input` (before resampling): a ``"CT"`` model refuses an image whose intensities are
  not Hounsfield units (an MR, a [0, 1] image: no air near −1000 HU, no fat near −100 HU) with a
  :class:`TransferSegError`; a CT without air (cropped inside the body) gets a warning.
* :func:`check_result` (after post-processing): when the organ found is smaller than a whole
  organ could be in a scan of this length (``min_ml``, or ``min_ml_per_cm`` per cm of the scan's
  head-to-foot extent when that is less: a scan of 4 cm holds only a slab of liver), when the body
  is narrower than ``min_body_cm2`` where the organ was found (an adult abdomen is 400–900 cm²
  across, a head 150–250), when the organ's centre lies less than ``min_offset_mm`` towards the
  patient's ``side`` of the body's centre (a liver lies 45–75 mm to the right; a bladder or a
  brain in the middle), or when the lesion fills more than ``max_fraction`` of the organ that
  holds it (a tumor is never larger than the liver that holds it; a model reading a brain as
  liver does that), the labels are emptied and a warning says why: "no liver found: the scan
  does not seem to cover the upper abdomen".

Imports nothing above :mod:`TransferSegLib.volume`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volume import TransferSegError, Volume, anatomical_axes, label_counts

__all__ = ["check_input", "check_result", "hu_percentiles"]

_SAMPLE = 1 << 20  # voxels looked at for the intensity check: a strided sample is enough, and cheap


def hu_percentiles(volume: Volume, percentiles=(1, 50, 99)) -> tuple:
    """Percentiles of a strided sample of the voxels (about a million), without copying the volume."""
    array = volume.array
    step = max(1, int(round((array.size / _SAMPLE) ** (1 / 3))))
    sample = array[::step, ::step, ::step]
    return tuple(float(v) for v in np.percentile(sample, percentiles))


def check_input(volume: Volume, card: dict) -> list:
    """Warnings about ``volume`` for the card's ``expects`` (a list, often empty); raises
    :class:`TransferSegError` for an input the model cannot read at all (not CT in HU for a CT model)."""
    expects = card.get("expects") or {}
    if expects.get("modality") != "CT":
        return []
    low, _, high = hu_percentiles(volume)
    shown = f"1st–99th percentile {low:.4g} … {high:.4g}"
    if low <= -500 and high >= 0:
        return []  # air (outside the body, the lungs, the bowel) and tissue: CT in HU
    region = expects.get("region", "the body")
    if low <= -50 and high >= 0 and high <= 3500:  # fat but no air: a CT cropped inside the body
        return [f"the input has no air in it ({shown} HU): a CT cropped inside the body? {card['name']} was trained "
                f"on whole scans of {region}; the result may be unreliable"]
    raise TransferSegError(
        f"the input's intensities ({shown}) do not look like CT in Hounsfield units (air near −1000, fat near "
        f"−100, soft tissue 0–100); {card['name']} reads CT only — give the CT itself, not an MR or a normalised image")


def _organ_floor_ml(volume: Volume, organ: dict) -> float:
    """The smallest organ a scan of this head-to-foot length would hold if it covered the organ."""
    k_axis = anatomical_axes(volume.directions)["S"]  # the array axis closest to head-to-foot
    length_cm = volume.shape[k_axis] * volume.spacing[k_axis] / 10.0
    return min(float(organ.get("min_ml", 0.0)), float(organ.get("min_ml_per_cm", 0.0)) * length_cm)


def _organ_in_slices(volume: Volume, labels: np.ndarray, organ_labels) -> tuple:
    """``(axis, others, organ mask, held)``: the array axis closest to head-to-foot, the other two, where
    the organ's labels are, and which head-to-foot slices hold them (a boolean per slice)."""
    axis = anatomical_axes(volume.directions)["S"]
    others = tuple(a for a in range(3) if a != axis)
    organ = np.isin(labels, organ_labels)
    return axis, others, organ, organ.any(axis=others)


def _body_area_cm2(volume: Volume, where: tuple) -> float:
    """The median cross-section of the body part that holds the organ's labels (in each head-to-foot
    slice that holds them, the connected parts of the body — voxels above −300 HU, not air, not lung —
    that the labels touch): the trunk, not the trunk and arms, nor two thighs taken together."""
    axis, others, organ, held = where
    pixel_cm2 = float(np.prod([volume.spacing[a] for a in others])) / 100.0
    areas = []
    for index in np.flatnonzero(held):
        body = np.take(volume.array, index, axis=axis) > -300.0
        parts, _ = ndimage.label(body)
        touched = np.unique(parts[np.take(organ, index, axis=axis) & body])
        areas.append(np.isin(parts, touched[touched > 0]).sum())
    return float(np.median(areas)) * pixel_cm2


def _mean_index(mask: np.ndarray) -> np.ndarray:
    """The (k, j, i) centre of mass of ``mask``, from its three projections (no index list in memory)."""
    total = float(mask.sum())
    return np.array([np.dot(mask.sum(axis=tuple(b for b in range(3) if b != a)), np.arange(mask.shape[a])) / total
                     for a in range(3)])


def _offset_mm(volume: Volume, where: tuple, side: str) -> float:
    """How far (mm) the organ's centre lies towards the patient's ``side`` ("right" or "left") of the
    body's centre (voxels above −300 HU) in the same head-to-foot slices."""
    axis, _, organ, held = where
    shape = [1, 1, 1]
    shape[axis] = -1
    body = (volume.array > -300.0) & held.reshape(shape)
    if not body.any():
        return 0.0
    centres = volume.ijk_to_ras_points(np.stack([_mean_index(organ), _mean_index(body)]))
    towards_right = centres[0, 0] - centres[1, 0]  # RAS: +x points to the patient's right
    return float(towards_right if side == "right" else -towards_right)


def check_result(labels: np.ndarray, volume: Volume, card: dict) -> tuple:
    """``(labels, warnings)``: the labels unchanged, or emptied with a warning when the card's
    organ is not plausibly there (too small for the scan) or its lesion is implausibly large."""
    expects = card.get("expects") or {}
    organ = expects.get("organ")
    if not organ or card.get("task", "segmentation") != "segmentation":
        return labels, []
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    counts = label_counts(labels)
    found_ml = float(sum(counts[v] for v in organ["labels"] if v < len(counts))) * voxel_ml
    region = expects.get("region", "the body")
    floor = _organ_floor_ml(volume, organ)
    why = None
    if found_ml < floor:
        why = (f"no {organ['name']} found: the scan does not seem to cover {region} (the {organ['name']} labels "
               f"add up to {found_ml:.0f} mL, less than the {floor:.0f} mL a scan of this length would hold)")
    where = _organ_in_slices(volume, labels, organ["labels"]) if why is None and found_ml > 0 else None
    if where is not None and organ.get("min_body_cm2"):
        across = _body_area_cm2(volume, where)
        if across < organ["min_body_cm2"]:
            adult = region.removeprefix("the ")
            why = (f"no {organ['name']} found: the body part that holds the {organ['name']} labels is "
                   f"{across:.0f} cm² across, less than the {organ['min_body_cm2']:g} cm² of an adult's {adult}; "
                   f"the scan does not seem to cover {region} (a head, a limb, or a small child?)")
    if why is None and where is not None and organ.get("side"):
        offset = _offset_mm(volume, where, organ["side"])
        if offset < organ.get("min_offset_mm", 0.0):
            why = (f"no {organ['name']} found: the {organ['name']} labels lie {offset:.0f} mm towards the patient's "
                   f"{organ['side']} of the body's middle, where the {organ['name']} lies at least "
                   f"{organ.get('min_offset_mm', 0.0):g} mm; the scan does not seem to cover {region}")
    lesion = expects.get("lesion")
    if why is None and lesion and found_ml > 0:
        lesion_ml = float(counts[lesion["label"]] if lesion["label"] < len(counts) else 0) * voxel_ml
        if lesion_ml > lesion["max_fraction"] * found_ml:
            why = (f"no plausible {organ['name']} found: the {lesion['name']} would fill {lesion_ml:.0f} of "
                   f"{found_ml:.0f} mL of {organ['name']} ({100 * lesion_ml / found_ml:.0f} %); the scan does not "
                   f"seem to show {region} as {card['name']} knows it")
    if why is None:
        return labels, []
    return np.zeros_like(labels), [why + "; no labels are given"]
