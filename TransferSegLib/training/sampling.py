"""Training data: the cases on their working grid (generated, resampled and cached), and the
patches drawn from them with augmentation (:class:`PatchSampler`)."""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..atomic import atomic_output
from ..datasets import find_cases, negative_cases, phantom_cases
from ..preprocessing import preprocess
from ..resample import labels_to_spacing, to_orientation, to_spacing
from ..views import directions_of, to_view, view_permutation
from ..volume import TransferSegError


@dataclass
class TrainingCase:
    """One preprocessed case held in memory for patch sampling."""

    name: str
    image: np.ndarray  # float32 (k, j, i), preprocessed, padded to at least the patch
    target: np.ndarray  # uint8 labels, or float32 heatmap, same shape
    pad_value: float
    positives: np.ndarray  # flat indices of the positive voxels (grouped by connected region)
    source_spacing: tuple = ()  # the case's own spacing (working orientation), before resampling
    regions: np.ndarray = None  # start of each connected positive region in ``positives``, then its end


@dataclass
class StackCase:
    """A case already on its working grid and preprocessed, as an .npz of arrays: ``image``
    (C, k, j, i) float32 in [0, 1] (e.g. the CT and three views' predictions, for a fusion
    network), ``target`` (k, j, i) and ``spacing`` (k, j, i) mm."""

    name: str
    path: Path

    def arrays(self) -> tuple:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                image, target = stored["image"], stored["target"]
                spacing = tuple(stored["spacing"].tolist()) if "spacing" in stored else ()
        except (OSError, ValueError, KeyError) as e:
            raise TransferSegError(f"{self.path}: not a readable stack (.npz with image, target): {e}") from None
        if image.ndim != 4 or image.shape[1:] != target.shape:
            raise TransferSegError(f"{self.path}: a stack's image is (C, k, j, i) and its target (k, j, i); got "
                                   f"{image.shape} and {target.shape}")
        return image, target, spacing


def write_stack(path, image: np.ndarray, target: np.ndarray, spacing) -> None:
    """Write a :class:`StackCase` file (atomically)."""
    with atomic_output(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, image=np.asarray(image, np.float32), target=np.asarray(target), spacing=np.asarray(spacing))


def cases_from_spec(data: dict) -> list:
    if "stacks" in data:
        folder = Path(data["stacks"])
        if not folder.is_dir():
            raise TransferSegError(f"data.stacks: {folder} is not a folder")
        cases = [StackCase(p.name[: -len(".npz")], p) for p in sorted(folder.glob("*.npz"))]
        if not cases:
            raise TransferSegError(f"data.stacks: {folder} holds no .npz stacks")
    elif "root" in data:
        cases = find_cases(data["root"])
        cases = cases[: data["limit"]] if data.get("limit") else cases
    else:
        cases = phantom_cases(data["phantom"], data["count"], data["seed"], vary=data.get("vary"),
                              target=data.get("target"), **data.get("options", {}))
        if data.get("negatives"):
            cases += negative_cases(data["negatives"], vary=data.get("vary"), **data.get("options", {}))
    if data.get("select"):
        by_name = {case.name: case for case in cases}
        missing = [name for name in data["select"] if name not in by_name]
        if missing:
            raise TransferSegError(f"data.select names case(s) the data does not have: {', '.join(missing[:5])}")
        cases = [by_name[name] for name in data["select"]]
    return cases


def _working_case(case, spacing, orientation, heatmap: bool):
    """``case`` loaded and put on the working grid with the pipeline's own resampling:
    ``(image array, target array, source spacing)``."""
    volume, target = case.load()
    if target is None:
        raise TransferSegError(f"case {case.name} has no label map; training needs labelled data")
    if np.shape(target) != volume.shape:
        raise TransferSegError(f"case {case.name}: the target has shape {np.shape(target)} but the image {volume.shape}")
    volume, turn = to_orientation(volume, orientation)
    source_spacing = volume.spacing
    target = turn.apply(np.asarray(target))
    if spacing is not None:
        working = to_spacing(volume, spacing)
        if heatmap:
            target = to_spacing(volume.with_array(target), spacing, antialias=False).array  # keep the peaks
        else:
            target = labels_to_spacing(target, volume, working)
        volume = working
    return volume.array, target, source_spacing


def _cache_key(case, config: dict) -> str:
    what = {"case": case.name, "image": str(getattr(case, "image_path", None)), "seed": getattr(case, "seed", None),
            "options": getattr(case, "options", None), "spacing": config["working_spacing_mm"],
            "orientation": config["working_orientation"], "task": config["task"], "version": 2}
    if getattr(case, "target", None):  # only then, so the caches of cases without one stay valid
        what["target"] = case.target
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', case.name)}-{digest}.npz"


def cached_working_case(case, config: dict, cache: Optional[Path]):
    """_working_case through an .npz cache (arrays only; read with allow_pickle=False)."""
    if isinstance(case, StackCase):
        return case.arrays()
    path = cache / _cache_key(case, config) if cache is not None else None
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return stored["image"], stored["target"], tuple(stored["spacing"].tolist())
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache entry is made again
    image, target, spacing = _working_case(case, config["working_spacing_mm"], config["working_orientation"],
                                           config["task"] == "heatmap")
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, image=image, target=target, spacing=np.asarray(spacing))
    return image, target, spacing


def load_cases(cases: list, config: dict, cache: Optional[Path], workers: int, report=None) -> list:
    """Every case as a :class:`TrainingCase`; ``workers`` processes generate / resample them."""
    if workers > 1 and len(cases) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(cached_working_case, case, config, cache) for case in cases]
            loaded = []
            for n, future in enumerate(futures):
                loaded.append(future.result())
                if report:
                    report(n + 1, len(cases))
    else:
        loaded = []
        for n, case in enumerate(cases):
            loaded.append(cached_working_case(case, config, cache))
            if report:
                report(n + 1, len(cases))
    return [load_case(case, config, data) for case, data in zip(cases, loaded)]


def load_case(case, config: dict, loaded=None) -> TrainingCase:
    if loaded is None:
        loaded = cached_working_case(case, config, None)
    array, target, _ = loaded
    data = config["data"]
    if isinstance(case, StackCase):
        image = np.asarray(array, np.float32)
        if data.get("channels") is not None:
            if max(data["channels"]) >= image.shape[0]:
                raise TransferSegError(f"case {case.name}: data.channels {data['channels']} but the stack has "
                                       f"{image.shape[0]} channels")
            image = image[data["channels"]]
        if data.get("crop_to_foreground") is not None:
            image, target = _crop_to_foreground(image, np.asarray(target), data["crop_to_foreground"])
    else:
        image = preprocess(array, config["preprocessing"])
    if config["view"] is not None:  # the view's slice stack: (slice, row, column)
        permutation = view_permutation(directions_of(config["working_orientation"]), config["view"])
        image, target = to_view(image, permutation), to_view(np.asarray(target), permutation)
    if config["task"] == "segmentation":
        target = np.asarray(target)
        if target.dtype.kind == "f" and not np.array_equal(target, np.round(target)):
            raise TransferSegError(f"case {case.name}: the label map holds non-integer values")
        target = target.astype(np.uint8)
        extra = sorted(set(np.unique(target).tolist()) - {0} - {e["label"] for e in config["labels"]})
        if extra:
            raise TransferSegError(
                f"case {case.name}: the label map holds value(s) {extra} that the config's labels do not name"
            )
        positive = config["positive_labels"] or [e["label"] for e in config["labels"]]
        is_positive = np.isin(target, positive)
    else:
        target = np.asarray(target, dtype=np.float32)
        is_positive = target >= config["positive_threshold"]
    pad_value = float(image.min())
    patch = config["patch_size"]
    padding = [(0, max(0, p - s)) for p, s in zip(patch, image.shape[-3:])]
    if any(after for _, after in padding):  # a volume smaller than the patch
        image = np.pad(image, [(0, 0)] * (image.ndim - 3) + padding, constant_values=pad_value)
        target = np.pad(target, padding)
        is_positive = np.pad(is_positive, padding)
    positives, regions = _positive_voxels(is_positive, config.get("positive_sampling", "voxel") == "component")
    return TrainingCase(case.name, np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target),
                        pad_value, positives, tuple(float(v) for v in loaded[2]), regions)


def _positive_voxels(is_positive: np.ndarray, by_region: bool) -> tuple:
    """(flat indices of the positive voxels, region bounds): with ``by_region`` the indices are
    grouped by 26-connected region and ``bounds[r]:bounds[r + 1]`` are region r's; else None."""
    if not by_region:
        return np.flatnonzero(is_positive), None
    regions, count = ndimage.label(is_positive, structure=np.ones((3, 3, 3), bool))
    flat = regions.ravel()
    positives = np.flatnonzero(flat)
    order = np.argsort(flat[positives], kind="stable")
    sizes = np.bincount(flat[positives], minlength=count + 1)[1:]
    return positives[order], np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _crop_to_foreground(image: np.ndarray, target: np.ndarray, margin: int) -> tuple:
    """(image, target) cut to the box of the target's foreground padded by ``margin`` voxels
    (VFN sec. 2.3: the region of interest); a case without foreground is kept whole."""
    found = np.nonzero(target)
    if not found[0].size:
        return image, target
    box = tuple(slice(max(0, int(f.min()) - margin), int(f.max()) + 1 + margin) for f in found)
    return np.ascontiguousarray(image[(Ellipsis,) + box]), np.ascontiguousarray(target[box])


def rotations90(planes) -> list:
    """The rotations by multiples of 90° generated by quarter turns in ``planes`` ([[a, b], ...]),
    each as (axis permutation, axes to flip) to apply to a (k, j, i) array.  One plane gives 4
    rotations; two or three planes of a cube give all 24.  ``[]`` for no planes."""
    if not planes:
        return []
    generators = []
    for a, b in planes:
        m = np.eye(3, dtype=int)
        m[a, a], m[a, b], m[b, a], m[b, b] = 0, -1, 1, 0
        generators.append(m)
    seen = {tuple(np.eye(3, dtype=int).ravel())}
    frontier = [np.eye(3, dtype=int)]
    while frontier:
        current = frontier.pop()
        for g in generators:
            product = g @ current
            key = tuple(product.ravel())
            if key not in seen:
                seen.add(key)
                frontier.append(product)
    rotations = []
    for key in sorted(seen):
        m = np.array(key).reshape(3, 3)
        perm = tuple(int(np.flatnonzero(row)[0]) for row in m)
        flips = tuple(i for i, row in enumerate(m) if row[perm[i]] < 0)
        rotations.append((perm, flips))
    return rotations


def _rotation_in_plane(a: int, b: int, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    m = np.eye(3)
    m[a, a], m[a, b], m[b, a], m[b, b] = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return m


def elastic_displacement(rng: np.random.Generator, patch, magnitude, spacing) -> np.ndarray:
    """A smooth random displacement field (3, k, j, i) over a patch, in voxels: independent normal
    displacements (standard deviation ``magnitude[a]`` along axis a) at control points ``spacing``
    voxels apart (clipped at three standard deviations), a control point beyond each end of the patch,
    blended by the cubic B-spline whose coefficients they are (no overshoot: every displacement lies
    within its neighbouring control points').  Its slope is at most the largest difference of two
    neighbouring control points over their spacing, 6 × magnitude / spacing, so with ``magnitude``
    ≤ ``spacing`` / 6 (what the config allows) the patch never folds."""
    patch = np.asarray(patch, int)
    spacing = np.asarray(spacing, float)
    controls = tuple(int(n) for n in np.ceil((patch - 1) / spacing).astype(int) + 3)  # a point beyond each end
    field = np.empty((3,) + tuple(int(p) for p in patch), np.float64)
    for axis in range(3):
        if magnitude[axis] <= 0:
            field[axis] = 0.0
            continue
        points = np.clip(rng.normal(0.0, magnitude[axis], controls), -3 * magnitude[axis], 3 * magnitude[axis])
        # voxel v of the patch sits at control coordinate 1 + v / spacing
        where = np.meshgrid(*[1.0 + np.arange(p) / s for p, s in zip(patch, spacing)], indexing="ij")
        field[axis] = ndimage.map_coordinates(points, where, order=3, mode="nearest", prefilter=False)
    return field


class PatchSampler:
    """Draws training patches on the fly: item ``index`` of step ``step`` is a pure function of
    (seed, step, index), so any process can draw any share of a global batch.

    A patch is positive with probability ``positive_fraction`` (if any case has positive voxels):
    it is centred on a random positive voxel of a random positive case (``positive_sampling``
    "voxel") or of a random connected positive region of all cases ("component"), moved by a
    uniform jitter of up to ± ``positive_jitter`` · patch / 2 per axis (the voxel stays inside
    the patch) and clipped to the volume; otherwise it lies uniformly at random in a random
    case.  Then, in this order: a small rotation and isotropic zoom about the patch centre (one
    affine resampling straight from the volume: image with ``image_order``, labels nearest,
    outside the volume the image's minimum and label 0; with ``elastic``, a smooth random
    displacement from :func:`elastic_displacement` joins that same resampling), a random 90° rotation from
    :func:`rotations90`, and flips.
    """

    def __init__(self, cases: list, config: dict, workers: int = 0):
        if not cases:
            raise TransferSegError("no training cases: every case went to validation; lower validation.fraction")
        self.cases, self.seed = cases, config["seed"]
        self.patch = np.array(config["patch_size"])
        self.positive_fraction, self.jitter = config["positive_fraction"], config["positive_jitter"]
        self.aug = config["augmentation"]
        self.heatmap = config["task"] == "heatmap"
        self.rot90 = rotations90(self.aug["rot90_axes"])
        self.positive_cases = [n for n, c in enumerate(cases) if c.positives.size]
        self.regions = None  # with positive_sampling "component": (case, first, end) of every region
        if config.get("positive_sampling", "voxel") == "component":
            self.regions = [(n, int(a), int(b)) for n, c in enumerate(cases) if c.regions is not None
                            for a, b in zip(c.regions[:-1], c.regions[1:])]
        self.pool = ThreadPoolExecutor(workers) if workers else None

    def item(self, step: int, index: int):
        """(image float32, target) patches of shape ``patch_size``."""
        rng = np.random.default_rng([self.seed, step, index])
        patch = self.patch
        if self.positive_cases and rng.random() < self.positive_fraction:
            if self.regions:
                n, first, end = self.regions[rng.integers(len(self.regions))]
                case, flat = self.cases[n], self.cases[n].positives[rng.integers(first, end)]
            else:
                case = self.cases[self.positive_cases[rng.integers(len(self.positive_cases))]]
                flat = case.positives[rng.integers(case.positives.size)]
            voxel = np.array(np.unravel_index(flat, case.target.shape))
            half = patch // 2
            jitter = np.round(rng.uniform(-1.0, 1.0, 3) * self.jitter * patch / 2).astype(int)
            jitter = np.clip(jitter, half - patch + 1, half)  # keep the voxel inside the patch
            start = voxel + jitter - half
        else:
            case = self.cases[rng.integers(len(self.cases))]
            start = np.array([rng.integers(0, s - p + 1) for s, p in zip(case.target.shape, patch)])
        start = np.clip(start, 0, np.array(case.target.shape) - patch)
        return self._augmented(case, start, rng)

    def _augmented(self, case: TrainingCase, start: np.ndarray, rng: np.random.Generator):
        aug = self.aug
        matrix = None
        if (aug["rotate_deg"] > 0 or aug["scale"]) and rng.random() < aug["probability"]:
            matrix = np.eye(3)
            for a, b in aug["rotate_axes"]:
                matrix = _rotation_in_plane(a, b, rng.uniform(-aug["rotate_deg"], aug["rotate_deg"])) @ matrix
            if aug["scale"]:
                matrix = matrix / rng.uniform(*aug["scale"])  # output → input: zoom in by the factor
        rotation = None
        if self.rot90 and rng.random() < aug["probability"]:
            rotation = self.rot90[rng.integers(len(self.rot90))]
        flips = [axis for axis in aug["flip_axes"] if rng.random() < 0.5]
        # drawn last, so a config without it draws every other augmentation as before
        displacement = None
        if aug["elastic"] and rng.random() < aug["probability"]:
            displacement = elastic_displacement(rng, self.patch, aug["elastic"]["magnitude"], aug["elastic"]["spacing"])

        target_order = 1 if self.heatmap else 0
        channels = case.image.ndim == 4  # (C, k, j, i): every channel moves with the others
        planes = case.image if channels else case.image[None]
        shape = tuple(int(p) for p in self.patch)
        if matrix is None and displacement is None:
            box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
            image, target = case.image[(Ellipsis,) + box], case.target[box]
        elif displacement is None:
            offset = self._offset(matrix, start)
            image = np.stack([ndimage.affine_transform(plane, matrix, offset, shape, output=np.float32,
                                                       order=aug["image_order"], mode="constant", cval=case.pad_value,
                                                       prefilter=False) for plane in planes])
            image = image if channels else image[0]
            target = ndimage.affine_transform(case.target, matrix, offset, shape, output=case.target.dtype,
                                              order=target_order, mode="constant", cval=0, prefilter=False)
        else:  # the affine map (or none) and the smooth displacement in one resampling
            matrix = np.eye(3) if matrix is None else matrix
            offset = self._offset(matrix, start)
            grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
            coords = (matrix @ grid + offset[:, None] + displacement.reshape(3, -1)).reshape((3,) + shape)
            image = np.stack([ndimage.map_coordinates(plane, coords, output=np.float32, order=aug["image_order"],
                                                      mode="constant", cval=case.pad_value, prefilter=False)
                              for plane in planes])
            image = image if channels else image[0]
            target = ndimage.map_coordinates(case.target, coords, output=case.target.dtype, order=target_order,
                                             mode="constant", cval=0, prefilter=False)
        lead = 1 if channels else 0
        if rotation is not None:
            perm, axes = rotation
            image = np.transpose(image, tuple(range(lead)) + tuple(lead + p for p in perm))
            target = np.transpose(target, perm)
            if axes:
                image, target = np.flip(image, tuple(lead + a for a in axes)), np.flip(target, axes)
        if flips:
            image, target = np.flip(image, tuple(lead + a for a in flips)), np.flip(target, flips)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(target)

    def _offset(self, matrix: np.ndarray, start: np.ndarray) -> np.ndarray:
        """The offset that, with ``matrix`` (patch voxel → case voxel), turns the patch about its
        centre and places it at ``start``."""
        centre_out = (self.patch - 1) / 2.0
        return start + centre_out - matrix @ centre_out

    def batch(self, step: int, indices) -> tuple:
        """Tensors (n, C, k, j, i) float32 (C = 1 for a plain image) and (n, k, j, i) int64 labels or
        (n, 1, k, j, i) float32 heatmaps."""
        indices = list(indices)
        if self.pool is not None:
            items = list(self.pool.map(lambda i: self.item(step, i), indices))
        else:
            items = [self.item(step, i) for i in indices]
        images = torch.from_numpy(np.stack([image for image, _ in items]))
        images = images[:, None] if images.ndim == 4 else images
        targets = torch.from_numpy(np.stack([target for _, target in items]))
        targets = targets[:, None].float() if self.heatmap else targets.long()
        return images, targets

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
