"""Image/label pairs for training and evaluation, from the layouts users already have.

* Medical Segmentation Decathlon: ``ROOT/dataset.json`` + ``imagesTr/`` + ``labelsTr/``
  (e.g. Task03_Liver: labels 0 background, 1 liver, 2 cancer, as ours).
* LiTS: ``volume-N.nii`` + ``segmentation-N.nii`` anywhere under ROOT (the "Training Batch"
  folders included).
* TransferSeg phantoms, as written by ``transferseg phantom ct``: ``ct_NNN.nii.gz`` +
  ``ct_NNN_label.nii.gz``; or generated in memory with :func:`phantom_cases` (CT label maps,
  or DBT volumes with their AH-Net eq. (5) lesion heatmaps and boxes).

A :class:`Case` loads lazily, so a 131-volume LiTS folder costs nothing until a case is used.
Every file of a case is a regular file inside ROOT once its links are followed (:func:`_data_file`):
nothing outside the folder the user named is read.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import phantoms
from .atomic import is_utf8, resolved
from .heatmaps import gaussian_heatmap
from .io import load_volume
from .volume import TransferSegError

__all__ = ["CTPhantomCase", "Case", "DBTPhantomCase", "find_cases", "phantom_cases", "split_cases"]


@dataclass
class Case:
    """One image with its (optional) label map; ``load()`` returns ``(Volume, uint8 labels or None)``."""

    name: str
    image_path: Optional[Path] = None
    label_path: Optional[Path] = None
    _make: Optional[Callable] = field(default=None, repr=False)

    def load(self):
        if self._make is not None:
            return self._make()
        volume = load_volume(self.image_path)
        if self.label_path is None:
            return volume, None
        label_volume = load_volume(self.label_path)
        if label_volume.shape != volume.shape:
            raise TransferSegError(
                f"case {self.name}: label map {self.label_path.name} has shape {label_volume.shape} "
                f"but the image has {volume.shape}"
            )
        if not np.allclose(label_volume.ijk_to_ras, volume.ijk_to_ras, atol=1e-3):
            raise TransferSegError(f"case {self.name}: the label map does not lie on the image's grid")
        labels = label_volume.array
        if np.any(labels != np.round(labels)) or labels.min() < 0 or labels.max() > 255:
            raise TransferSegError(f"case {self.name}: {self.label_path.name} is not a label map (values 0…255)")
        return volume, labels.astype(np.uint8)


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


_MAX_DESCRIPTION_BYTES = 64 << 20  # Task03_Liver's dataset.json is 25 KB; more is not a description


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def _data_file(root: Path, path, what: str) -> Path:
    """``path`` with its links followed, if it is a regular file inside the data folder ``root``; else
    a TransferSegError that starts with ``what``.

    Every file of a data set goes through here, so nothing outside the folder the user named is
    read (``../secret``, an absolute path, a link out of the folder), and nothing that blocks a
    read for ever (a FIFO) or never ends (a device) is opened."""
    if "\x00" in str(path):
        raise TransferSegError(f"{what}: the path holds a NUL character, so it names no file")
    if not is_utf8(path):  # SimpleITK aborts the process on such a name
        raise TransferSegError(f"{what}: the name is not valid UTF-8 (its bytes are shown escaped); rename the file")
    folder, full = resolved(root), resolved(path)
    if full != folder and folder not in full.parents:
        raise TransferSegError(f"{what}: leads outside the data folder {root} (to {full}); only files inside "
                               "the data folder are read, so copy the file into it")
    try:
        mode = os.stat(full).st_mode
    except FileNotFoundError:
        raise TransferSegError(f"{what}: the file {full} is missing") from None
    except OSError as e:
        raise TransferSegError(f"{what}: cannot read {full} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise TransferSegError(f"{what}: this is {_kind(mode)}, not a regular file")
    return full


def _read_description(root: Path) -> dict:
    """``root/dataset.json`` parsed, if it is a regular file inside ``root`` of a sensible size."""
    path = _data_file(root, root / "dataset.json", str(root / "dataset.json"))
    try:
        size = os.stat(path).st_size
        if size > _MAX_DESCRIPTION_BYTES:
            raise TransferSegError(f"{root}/dataset.json is {size / 2**20:.0f} MiB; a Decathlon dataset description "
                                   "is a few KB of JSON")
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, an integer of 5,000 digits
        raise TransferSegError(f"{root}/dataset.json: not a readable Decathlon dataset description ({e})") from None
    except RecursionError:  # lists in lists, thousands deep
        raise TransferSegError(f"{root}/dataset.json is nested too deeply to be a Decathlon dataset "
                               "description") from None


def _msd_cases(root: Path) -> list[Case]:
    meta = _read_description(root)
    training = meta.get("training", []) if isinstance(meta, dict) else None
    if not isinstance(training, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("image"), str)
            and isinstance(entry.get("label") or "", str) for entry in training):
        raise TransferSegError(f"{root}/dataset.json: \"training\" must be a list of "
                               "{\"image\": \"./imagesTr/NAME.nii.gz\", \"label\": \"./labelsTr/NAME.nii.gz\"}")
    cases = []
    for entry in training:
        listed = f"{root / 'dataset.json'}: the training"
        image = _data_file(root, root / entry["image"], f"{listed} image {entry['image']!r}")
        label = (_data_file(root, root / entry["label"], f"{listed} label {entry['label']!r}")
                 if entry.get("label") else None)
        cases.append(Case(image.name.split(".")[0], image, label))
    if not cases:  # dataset.json without a training list: pair the folders by name
        for image in sorted((root / "imagesTr").glob("*.nii*"), key=lambda p: _natural_key(p.name)):
            if image.name.startswith("._"):
                continue
            label = root / "labelsTr" / image.name
            cases.append(Case(image.name.split(".")[0], _data_file(root, image, str(image)),
                              _data_file(root, label, str(label)) if os.path.lexists(label) else None))
    return cases


_LITS_VOLUME, _LITS_LABEL = re.compile(r"volume-(\d+)\.nii"), re.compile(r"segmentation-(\d+)\.nii")


def _lits_cases(root: Path) -> list[Case]:
    labels = {}  # case number -> its segmentation files anywhere under root (never above it)
    for label in root.rglob("segmentation-*.nii*"):
        match = _LITS_LABEL.match(label.name)
        if match:
            labels.setdefault(match.group(1), []).append(label)
    cases = []
    for image in sorted(root.rglob("volume-*.nii*"), key=lambda p: _natural_key(p.name)):
        if image.name.startswith("._"):
            continue
        match = _LITS_VOLUME.match(image.name)
        if not match:
            raise TransferSegError(f"{image}: a LiTS volume is named volume-N.nii or volume-N.nii.gz, N its case "
                                   "number, with its label map segmentation-N.nii(.gz); rename the file or move it "
                                   "out of the data folder")
        number = match.group(1)
        found = labels.get(number, [])
        # the one in the volume's own folder, else the nearest (e.g. volumes/ and segmentations/ side by side)
        label = min(found, key=lambda p: (-len(os.path.commonpath([p, image])), _natural_key(str(p))), default=None)
        cases.append(Case(f"lits-{number}", _data_file(root, image, str(image)),
                          _data_file(root, label, str(label)) if label else None))
    return cases


def _phantom_folder_cases(root: Path) -> list[Case]:
    cases = []
    for label in sorted(root.glob("*_label.nii.gz"), key=lambda p: _natural_key(p.name)):
        image = label.with_name(label.name.replace("_label.nii.gz", ".nii.gz"))
        if os.path.lexists(image):
            cases.append(Case(image.name.replace(".nii.gz", ""), _data_file(root, image, str(image)),
                              _data_file(root, label, str(label))))
    return cases


def find_cases(root) -> list[Case]:
    """All image/label pairs under ``root`` (MSD, LiTS or TransferSeg phantom layout)."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise TransferSegError(f"{root}: this is a file, not a data folder; give the folder that holds the cases")
    if not root.is_dir():
        raise TransferSegError(f"{root}: no such data folder")
    if os.path.lexists(root / "dataset.json"):
        cases = _msd_cases(root)
    elif any(root.rglob("volume-*.nii*")):
        cases = _lits_cases(root)
    else:
        cases = _phantom_folder_cases(root)
    if not cases:
        raise TransferSegError(
            f"{root}: found no image/label pairs; expected a Medical Segmentation Decathlon folder "
            "(dataset.json, imagesTr/, labelsTr/), LiTS files (volume-N.nii, segmentation-N.nii) "
            "or TransferSeg phantoms (ct_000.nii.gz, ct_000_label.nii.gz)"
        )
    return cases


@dataclass
class CTPhantomCase(Case):
    """A CT phantom (:func:`TransferSegLib.phantoms.ct_phantom`): ``load()`` returns ``(Volume, labels)``.

    A plain dataclass (no closure), so a process pool can generate cases in parallel.
    """

    seed: int = 0
    options: dict = field(default_factory=dict)

    def load(self):
        return phantoms.ct_phantom(self.seed, **self.options)


@dataclass
class CTNegativeCase(Case):
    """A CT phantom of a region without a liver, for a liver model to learn what is not one:
    ``region`` "chest" is :func:`~TransferSegLib.phantoms.ct_phantom` with ``coverage="chest"``
    (the phantom's other ``options``, e.g. its contrast phase, kept), any other a
    :func:`~TransferSegLib.phantoms.region_phantom` ("head", "neck", "pelvis", "legs") at ``options["shape"]``."""

    seed: int = 0
    options: dict = field(default_factory=dict)

    def load(self):
        options = dict(self.options)
        region = options.pop("region")
        if region == "chest":
            return phantoms.ct_phantom(self.seed, **dict(options, coverage="chest"))
        return phantoms.region_phantom(self.seed, region, shape=options["shape"])


#: the regions ``data.negatives`` may name
NEGATIVE_REGIONS = ("chest",) + tuple(phantoms.CT_REGIONS)


def negative_cases(spec: dict, vary: Optional[dict] = None, **options) -> list[Case]:
    """``spec["count"]`` :class:`CTNegativeCase` s with seeds ``spec["seed"], …``, the regions taken
    in turn from ``spec["regions"]`` (a region named twice comes twice as often), each case's grid
    drawn from ``vary`` as the CT phantoms' is."""
    regions = spec.get("regions")
    if not (isinstance(regions, list) and regions and all(r in NEGATIVE_REGIONS for r in regions)):
        raise TransferSegError(f"negatives.regions must be a list from {', '.join(NEGATIVE_REGIONS)}; got {regions!r}")
    count, seed = spec.get("count"), spec.get("seed", 0)
    if not (is_count(count) and is_count(seed, 0)):
        raise TransferSegError(f"negatives.count (≥ 1) and negatives.seed (≥ 0) are whole numbers; got {count!r}, {seed!r}")
    vary = check_vary("ct", dict(vary or {}))
    out = []
    for n in range(count):
        region = regions[n % len(regions)]
        drawn = _varied_options("ct", seed + n, options, vary)
        drawn["region"] = region
        out.append(CTNegativeCase(f"ct-{region}-{seed + n}", seed=seed + n, options=drawn))
    return out


def is_count(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class DBTPhantomCase(Case):
    """A DBT phantom (:func:`TransferSegLib.phantoms.dbt_phantom`) for heatmap training and FROC.

    ``load()`` returns ``(Volume, float32 heatmap)``, the heatmap being AH-Net eq. (5) on the
    phantom's lesion boxes (:func:`TransferSegLib.heatmaps.gaussian_heatmap`, each lesion
    peaking at 1); ``boxes`` are those lesions (dicts with ``box_kji``), what
    :func:`TransferSegLib.metrics.froc` scores detections against.

    ``target`` (:data:`HEATMAP_TARGET_KEYS`) shapes the heatmap: ``kinds`` keeps only those
    lesion kinds in it (and in ``boxes``), e.g. ``["mass"]`` for a mass detector composed with
    a calcification stage; ``sigma_floor_mm`` is the smallest σ of a Gaussian, so a 5 mm mass
    gets a target wide enough to learn (eq. 5 ties σ to the box alone).
    """

    seed: int = 0
    options: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    _boxes: Optional[list] = field(default=None, repr=False)

    def _phantom(self):
        volume, boxes = phantoms.dbt_phantom(self.seed, **self.options)
        kinds = self.target.get("kinds")
        self._boxes = [box for box in boxes if kinds is None or box["kind"] in kinds]
        return volume, self._boxes

    def load(self):
        volume, boxes = self._phantom()
        floor = float(self.target.get("sigma_floor_mm", 0.0))
        return volume, gaussian_heatmap(volume.shape, boxes, min_sigma=[floor / s for s in volume.spacing])

    @property
    def boxes(self) -> list:
        if self._boxes is None:
            self._phantom()
        return self._boxes


#: the keys of a DBT phantom's heatmap ``target`` (:class:`DBTPhantomCase`)
HEATMAP_TARGET_KEYS = ("kinds", "sigma_floor_mm")
LESION_KINDS = ("mass", "calcification_cluster")


def check_heatmap_target(target: dict) -> dict:
    """``target`` as :class:`DBTPhantomCase` takes it, or a TransferSegError naming what is wrong."""
    if not isinstance(target, dict):
        raise TransferSegError(f"a heatmap target is a JSON object with {', '.join(HEATMAP_TARGET_KEYS)}; got {target!r}")
    unknown = sorted(set(target) - set(HEATMAP_TARGET_KEYS))
    if unknown:
        raise TransferSegError(f"heatmap target keys are {', '.join(HEATMAP_TARGET_KEYS)}; got {unknown}")
    kinds = target.get("kinds")
    if kinds is not None and not (isinstance(kinds, list) and kinds and set(kinds) <= set(LESION_KINDS)):
        raise TransferSegError(f"heatmap target kinds must be a non-empty list of {', '.join(LESION_KINDS)}; got {kinds!r}")
    floor = target.get("sigma_floor_mm", 0.0)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 20:
        raise TransferSegError(f"heatmap target sigma_floor_mm must be a number of mm in [0, 20]; got {floor!r}")
    return target


VARY_KEYS = {"ct": ("slices", "rows"), "dbt": ("slices", "pixel_mm", "extent_mm", "extent_scale")}


def check_vary(kind: str, vary: dict) -> dict:
    unknown = sorted(set(vary) - set(VARY_KEYS[kind]))
    if unknown:
        raise TransferSegError(f"phantom 'vary' keys for {kind} are {', '.join(VARY_KEYS[kind])}; got {unknown}")
    for key, value in vary.items():
        what = "[rows_mm, columns_mm], both > 0" if key == "extent_mm" else "[low, high] with 0 < low ≤ high"
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
                and (key == "extent_mm" or value[0] <= value[1])):
            raise TransferSegError(f"phantom vary.{key} must be {what}; got {value!r}")
    if "extent_mm" in vary and "pixel_mm" not in vary:
        raise TransferSegError("phantom vary.extent_mm sets the rows and columns from vary.pixel_mm; give both")
    if "extent_scale" in vary and "extent_mm" not in vary:
        raise TransferSegError("phantom vary.extent_scale scales vary.extent_mm; give both")
    return vary


def _varied_options(kind: str, seed: int, options: dict, vary: dict) -> dict:
    """The phantom options of case ``seed``: each ``vary`` range drawn from its own seeded stream.

    CT: ``slices`` and ``rows`` ([low, high] whole numbers, uniform) set ``shape`` (square
    slices); the phantom's field of view is fixed by the patient, so ``rows`` sets the pixel
    size (e.g. rows 200–340 give about 0.9–2.5 mm pixels, slices 36–180 give 1–5 mm).
    DBT: ``pixel_mm`` (log-uniform) and ``extent_mm`` [rows_mm, columns_mm] (the detector
    area, uniform within ±10 %) set the in-plane grid; ``slices`` the slice count;
    ``extent_scale`` [low, high] multiplies the extent by a factor drawn uniformly (from a stream of
    its own, so the other draws stay as they were), for breasts up to a clinical detector's size.
    """
    if not vary:
        return dict(options)
    rng = np.random.default_rng([int(seed), 7919])
    out = dict(options)
    shape = list(out.get("shape") or ())
    if kind == "ct":
        shape = shape or list(phantoms.CT_DEFAULT_SHAPE)
        if "slices" in vary:
            shape[0] = int(rng.integers(int(vary["slices"][0]), int(vary["slices"][1]) + 1))
        if "rows" in vary:
            shape[1] = shape[2] = int(rng.integers(int(vary["rows"][0]), int(vary["rows"][1]) + 1))
    else:
        shape = shape or list(phantoms.DBT_DEFAULT_SHAPE)
        if "slices" in vary:
            shape[0] = int(rng.integers(int(vary["slices"][0]), int(vary["slices"][1]) + 1))
        if "pixel_mm" in vary:
            lo, hi = np.log(vary["pixel_mm"][0]), np.log(vary["pixel_mm"][1])
            pixel = float(np.exp(rng.uniform(lo, hi)))
            out["pixel_mm"] = round(pixel, 5)
            if "extent_mm" in vary:
                scale = 1.0
                if "extent_scale" in vary:
                    scale = float(np.random.default_rng([int(seed), 7919, 2]).uniform(*vary["extent_scale"]))
                shape[1] = max(32, int(round(vary["extent_mm"][0] * scale * rng.uniform(0.9, 1.1) / pixel)))
                shape[2] = max(32, int(round(vary["extent_mm"][1] * scale * rng.uniform(0.9, 1.1) / pixel)))
    out["shape"] = shape
    return out


def phantom_cases(kind: str, count: int, seed: int, vary: Optional[dict] = None, target: Optional[dict] = None,
                  **options) -> list[Case]:
    """``count`` in-memory phantom cases with seeds ``seed, seed + 1, …``.

    ``"ct"``: :class:`CTPhantomCase` (label maps 0/1/2);
    ``"dbt"``: :class:`DBTPhantomCase` (heatmap targets shaped by ``target``, ``case.boxes``).
    ``options`` are the phantom function's keyword arguments (e.g. ``shape``, ``pixel_mm``);
    ``vary`` draws each case's grid from ranges, so a model trains on the spacings users have
    (see :func:`_varied_options`).
    """
    if kind not in ("ct", "dbt"):
        raise TransferSegError(f"phantom cases for training are 'ct' (label maps) or 'dbt' (lesion heatmaps); got {kind!r}")
    vary = check_vary(kind, dict(vary or {}))
    if target and kind != "dbt":
        raise TransferSegError("a heatmap target shapes DBT phantoms' heatmaps; CT phantoms have label maps")
    extra = {"target": check_heatmap_target(dict(target))} if target else {}
    make = CTPhantomCase if kind == "ct" else DBTPhantomCase
    return [make(f"{kind}-phantom-{seed + n}", seed=seed + n, options=_varied_options(kind, seed + n, options, vary),
                 **extra) for n in range(count)]


def split_cases(cases: list, validation_fraction: float, seed: int):
    """A seeded (train, validation) split; at least one case on each side when there are two or more."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = int(round(len(cases) * validation_fraction))
    if len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val

