"""Volume → Result: the one entry point that the CLI, the Slicer module and the tests call.

``run(volume, model)`` turns the volume to the model's working orientation and spacing
(:mod:`TransferSegLib.resample`), runs the card's method (:mod:`TransferSegLib.methods`),
brings the outputs back onto the input's exact grid, derives the labels and post-processes.
``Result.write(folder)`` writes the files that ``Result.outputs()`` lists, all of them or none.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from .atomic import atomic_output_folder, available_memory_bytes, check_output_folder
from .devices import resolve_device
from .dicom_out import DicomOutputs, dicom_output_name, dicom_outputs
from .heatmaps import Detection, find_peaks
from .io import atomic_output, save_labelmap, save_scalar, save_segmentation
from .labels import VIEWS as VIEW_NAMES
from .methods import MethodContext, MethodOutput, check_options, get_method
from .models import DEFAULT_SEGMENTATION_MODEL, LoadedModel, load_model, read_card
from .progress import CancelToken, ProgressCallback, StageProgress, check_cancel
from .provenance import now, provenance, use_deterministic
from .render import save_gallery_png, save_overview_png
from .report import lesion_report, write_report_files
from .resample import back_to, grid_shape, to_orientation, to_spacing
from .scope import check_input, check_result
from .volume import TransferSegError, Volume, check_roi, label_counts

__all__ = ["VIEW_NAMES", "Result", "check_working_grid", "check_writable", "output_names", "run", "postprocess"]




def output_names(task: str, views=VIEW_NAMES, disagreement: bool = True, dicom: bool = True) -> list:
    """The files a run of ``task`` writes, relative to its folder, in a fixed order (result.json last):
    :meth:`Result.outputs` for a result with ``views`` and a ``disagreement``.  The defaults name
    every file a run of ``task`` may write, before the run says which (a multi-view method writes
    the views and their disagreement, a single network neither; only a DICOM input gets ``dicom``).

    Segmentation: segmentation.seg.nrrd, labelmap.nii.gz; heatmap task: heatmap.nii.gz,
    detections.json, detections.csv; with ``dicom`` segmentation.dcm (a DICOM SEG) or
    detections-sr.dcm (a DICOM SR); then views/axial|coronal|sagittal.nii.gz and
    disagreement.nii.gz, overview.png, views.png when there are views, lesions.csv, report.html,
    result.json.
    """
    unknown = set(views) - set(VIEW_NAMES)
    if unknown:
        raise ValueError(f"views must be named {', '.join(VIEW_NAMES)}; got {sorted(unknown)}")
    if task == "heatmap":
        names = ["heatmap.nii.gz", "detections.json", "detections.csv"]
    else:
        names = ["segmentation.seg.nrrd", "labelmap.nii.gz"]
    if dicom:
        names.append(dicom_output_name(task))
    names += [f"views/{view}.nii.gz" for view in VIEW_NAMES if view in views]
    if disagreement:
        names.append("disagreement.nii.gz")
    names.append("overview.png")
    if views:
        names.append("views.png")
    names += ["lesions.csv", "report.html"]
    names.append("result.json")
    return names


_NIFTI_MAX_AXIS = 32767  # NIfTI-1 stores each axis's size in a 16-bit integer
#: heatmap.nii.gz holds multiples of this (float32, exact): noise in the last bits of a network's output
#: does not compress, and a clinical DBT's heatmap went from 51 MB to 6 MB (detections come from the
#: unrounded heatmap; a viewer's colour map does not see 0.0005)
HEATMAP_QUANTUM = 1.0 / 1024


def check_writable(volume: Volume) -> None:
    """Refuse, before any inference, a volume whose outputs could not be written: the label map and
    the overlays are NIfTI-1 files, which hold at most 32,767 voxels along an axis."""
    if max(volume.shape) > _NIFTI_MAX_AXIS:
        shape = "×".join(str(n) for n in volume.shape)
        raise TransferSegError(f"the volume is {shape} voxels (k, j, i): its outputs are NIfTI files, which hold at "
                               f"most {_NIFTI_MAX_AXIS:,} voxels along an axis; crop or downsample it first")


@dataclass
class Result:
    """What a run produced, all on ``volume``'s grid (axes (k, j, i)).

    ``views`` holds a multi-view method's per-view probabilities, keyed by ``axial``,
    ``coronal`` and ``sagittal``: uint8 (k, j, i), or (K, k, j, i) with channel c for label c,
    probability × 255.  ``disagreement`` is the views' disagreement (k, j, i).  Both stay empty
    for single-network methods; :meth:`outputs` and :meth:`write` follow what is set.
    """

    volume: Volume
    labels: np.ndarray
    card: dict
    device: str
    timings: dict
    probabilities: Optional[np.ndarray] = None  # uint8 (K, k, j, i), probability × 255
    # heatmap task: the network's response on the model's working grid, with that grid's exact geometry
    # (at a DBT's 0.1 mm it is 25× smaller than the input); heatmap_on_input() gives it on the input grid
    heatmap: Optional[Volume] = None
    roi_kji: Optional[tuple] = None
    detections: list = field(default_factory=list)  # heatmap task: TransferSegLib.heatmaps.Detection
    fallbacks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    views: dict = field(default_factory=dict)
    disagreement: Optional[np.ndarray] = None
    method_summary: dict = field(default_factory=dict)  # e.g. the views' disagreement, for result.json
    working: Optional[Volume] = None  # heatmap task: the input on the working grid (the overview is drawn there)
    on_input: Optional[object] = field(default=None, repr=False)  # heatmap task: how to bring it back
    dicom: Optional[DicomOutputs] = field(default=None, repr=False)  # set by write: a DICOM input's SEG or SR
    provenance: dict = field(default_factory=dict)  # versions, model, device, command, times (provenance.py)
    _lesions: Optional[dict] = field(default=None, init=False, repr=False)  # lesions(), measured once

    def __post_init__(self):
        if self.heatmap is not None and not isinstance(self.heatmap, Volume):  # an array on the input's grid
            self.heatmap = Volume(self.heatmap, self.volume.spacing, self.volume.directions, self.volume.origin)
        if self.heatmap is not None and self.working is None:
            self.working = self.volume

    def heatmap_on_input(self) -> Optional[np.ndarray]:
        """The heatmap resampled linearly onto the input's grid (float32, the input's shape): for
        drawing over the input itself; costs a full-size float array, so it is made only on request."""
        if self.heatmap is None:
            return None
        if self.on_input is None:  # built on the input's grid
            return self.heatmap.array
        return self.on_input.values(self.heatmap.array, fill=0.0)

    @property
    def segments(self) -> list:
        return self.card["labels"]

    @property
    def task(self) -> str:
        return self.card.get("task", "segmentation")

    def volumes_ml(self) -> dict:
        """Volume of each segment in millilitres."""
        voxel_ml = float(np.prod(self.volume.spacing)) / 1000.0
        counts = label_counts(self.labels)
        return {seg["name"]: round(float(counts[seg["label"]]) * voxel_ml, 3) for seg in self.segments}

    def lesions(self) -> dict:
        """Per-lesion rows and their summary (:func:`TransferSegLib.report.lesion_report`), measured once."""
        if self._lesions is None:
            self._lesions = lesion_report(self)
        return self._lesions

    def outputs(self) -> list:
        """Every file :meth:`write` writes, relative to its folder, in a fixed order (result.json last):
        :func:`output_names` of this result's task, views and disagreement (and its DICOM file, once
        :meth:`write` has found the input to be DICOM)."""
        return output_names(self.task, self.views, self.disagreement is not None,
                            dicom=bool(self.dicom is not None and self.dicom.names))

    def summary(self) -> dict:
        card = self.card
        return {
            "model": {"name": card["name"], "version": card["version"], "sha256": card["weights"].get("sha256")},
            "device": self.device,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "volumes_ml": self.volumes_ml() if self.task == "segmentation" else None,
            "input": self.volume.summary(),
            "roi_kji": list(self.roi_kji) if self.roi_kji else None,
            "detections": len(self.detections) if self.task == "heatmap" else None,
            **({"detections_by_kind": _count_kinds(self.detections)} if self.task == "heatmap" else {}),
            **({"heatmap_grid": {"shape": list(self.heatmap.shape), "spacing_mm": list(self.heatmap.spacing),
                                 "quantum": HEATMAP_QUANTUM}}
               if self.heatmap is not None else {}),
            "fallbacks": self.fallbacks,
            "warnings": self.warnings,
            "lesions": self.lesions(),
            "dicom": self.dicom.note if self.dicom is not None else "not written: the result has not been written",
            "files": self.outputs(),
            **({"method": self.method_summary} if self.method_summary else {}),
            **({"provenance": self.provenance} if self.provenance else {}),
        }

    def write(self, folder, input_path=None) -> dict:
        """Write every file of :meth:`outputs` into ``folder``, all of them or none; return {name: path}.

        The files are written into a staging folder and moved in only when every one is complete
        (:func:`~TransferSegLib.io.atomic_output_folder`): a failure or cancellation leaves
        ``folder`` as it was, other files in it are never touched, and files of an earlier run
        with the same names are replaced.  Refuses to overwrite ``input_path``.  When ``input_path``
        is DICOM (a series folder or a multi-frame file), a DICOM SEG or SR referencing it is written
        too (:mod:`~TransferSegLib.dicom_out`); result.json["dicom"] says whether, or why not.
        """
        check_writable(self.volume)
        # built before anything is staged: a source it cannot describe leaves out the DICOM file, not the run
        self.dicom = dicom_outputs(input_path, self.volume, self.card, labels=self.labels, detections=self.detections)
        names = self.outputs()
        folder = check_output_folder(folder, names, input_path)
        with atomic_output_folder(folder, names) as staging:
            self._write_files(staging)
        return {name: folder / name for name in names}

    def _write_files(self, folder: Path) -> None:
        start = time.perf_counter()
        label_names = {seg["label"]: seg["name"] for seg in self.segments}
        if self.task == "heatmap":
            save_scalar(quantised(self.heatmap.array), self.heatmap, folder / "heatmap.nii.gz")
            rows = [d.to_dict() for d in self.detections]
            with atomic_output(folder / "detections.json") as tmp:
                tmp.write_text(json.dumps({"model": self.card["name"], "detections": rows}, indent=2) + "\n",
                               encoding="utf-8")
            with atomic_output(folder / "detections.csv") as tmp:
                lines = ["rank,kind,confidence,k,j,i,r_mm,a_mm,s_mm,k0,j0,i0,k1,j1,i1"]
                for n, d in enumerate(self.detections, 1):
                    lines.append(",".join(str(v) for v in [n, d.kind, f"{d.confidence:.6g}", *d.position_kji,
                                                          *(d.position_ras or ["", "", ""]), *d.box_kji]))
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            save_segmentation(self.labels, self.volume, folder / "segmentation.seg.nrrd", self.segments)
            save_labelmap(self.labels, self.volume, folder / "labelmap.nii.gz")
        if self.dicom is not None:
            self.dicom.save(folder)
        for view in VIEW_NAMES:
            if view in self.views:
                save_scalar(self.views[view], self.volume, folder / "views" / f"{view}.nii.gz")
        if self.disagreement is not None:
            save_scalar(self.disagreement, self.volume, folder / "disagreement.nii.gz")
        if self.task == "heatmap":
            # drawn on the heatmap's own (working) grid: a clinical DBT's 0.1 mm voxels add nothing to a PNG
            boxes = [{"box_kji": _box_between(d.box_kji, self.volume, self.working), "kind": d.kind}
                     for d in self.detections[:10]]
            save_overview_png(self.working, folder / "overview.png", heatmap=self.heatmap.array, boxes=boxes,
                              title=f"{self.card['name']} — {_detections_title(self.detections)}")
        else:
            save_overview_png(self.volume, folder / "overview.png", labels=self.labels, label_names=label_names,
                              title=f"{self.card['name']} — " + ", ".join(
                                  f"{k} {v:.1f} mL" for k, v in self.volumes_ml().items()))
        if self.views:
            # every row through the same voxel: the fused segmentation's centre (else the volume's)
            inside = np.argwhere(self.labels > 0) if np.any(self.labels) else None
            focus = inside.mean(axis=0).round().astype(int) if inside is not None else [n // 2 for n in self.volume.shape]
            del inside
            rows = []
            for view in VIEW_NAMES:
                if view not in self.views:
                    continue
                probabilities = np.asarray(self.views[view])
                if probabilities.ndim == 4:  # class probabilities: show the view's own label map
                    rows.append(dict(volume=self.volume, labels=probabilities.argmax(axis=0).astype(np.uint8),
                                     label_names=label_names, title=f"{view} network", focus=focus))
                else:
                    rows.append(dict(volume=self.volume, heatmap=probabilities, title=f"{view} network", focus=focus,
                                     heat_max=255.0 if probabilities.dtype == np.uint8 else 1.0))
            if self.disagreement is not None:
                rows.append(dict(volume=self.volume, heatmap=self.disagreement, focus=focus, heat_max=1.0,
                                 title="view disagreement (0 agree – 1)"))
            save_gallery_png(rows, folder / "views.png")
        write_report_files(self, folder, self.lesions())
        self.timings["write"] = time.perf_counter() - start
        with atomic_output(folder / "result.json") as tmp:
            tmp.write_text(json.dumps(self.summary(), indent=2) + "\n", encoding="utf-8")


def quantised(values: np.ndarray, quantum: float = HEATMAP_QUANTUM) -> np.ndarray:
    """``values`` rounded to the nearest multiple of ``quantum`` (a power of two: exact in float32)."""
    return (np.round(np.asarray(values, np.float32) / np.float32(quantum)) * np.float32(quantum)).astype(np.float32)


def _count_kinds(detections) -> dict:
    counts = {}
    for d in detections:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    return counts


def _detections_title(detections) -> str:
    counts = _count_kinds(detections)
    if set(counts) <= {"lesion"}:
        return f"{len(detections)} detection(s)"
    words = {kind: kind.replace("_", " ") for kind in counts}
    return ", ".join(f"{n} {words[kind] if n == 1 else words[kind] + ('es' if kind.endswith('s') else 's')}"
                     for kind, n in sorted(counts.items()))


def _box_between(box_kji, source: Volume, target: Volume) -> list:
    """A half-open voxel box on ``source``'s grid as the box on ``target``'s grid that covers it (through RAS)."""
    k0, j0, i0, k1, j1, i1 = box_kji
    corners = np.array([[k, j, i] for k in (k0 - 0.5, k1 - 0.5) for j in (j0 - 0.5, j1 - 0.5)
                        for i in (i0 - 0.5, i1 - 0.5)], float)
    kji = target.ras_to_ijk_points(source.ijk_to_ras_points(corners))
    lo = np.clip(np.floor(kji.min(axis=0) + 0.5 + 1e-6), 0, target.shape).astype(int)
    hi = np.clip(np.ceil(kji.max(axis=0) + 0.5 - 1e-6), 0, target.shape).astype(int)
    return [int(v) for v in lo] + [int(v) for v in np.maximum(hi, lo + 1)]


def postprocess(labels: np.ndarray, spec: Optional[dict], spacing=None) -> np.ndarray:
    """Card-driven clean-up of a label map (in place on a copy), in this order:

    ``{"largest_component": [1, 2]}`` keeps only the largest 26-connected component of the union
    of those labels (e.g. the liver with its tumors) and clears the rest of them;
    ``{"fill_holes": [1, 2]}`` fills the 3D holes of the union of those labels (background
    enclosed by it, as ``scipy.ndimage.binary_fill_holes``; a cavity open to the volume's edge
    is no hole) with the first listed label, the liver; other labels enclosed are kept;
    ``{"inside": {"2": [1, 2]}}`` keeps label 2 only where it lies inside the filled region of
    labels {1, 2};
    ``{"min_volume_ml": {"2": 0.25}}`` relabels every 26-connected component of label 2 smaller
    than 0.25 mL (needs ``spacing``, the label map's voxel size in mm) with the label that most
    of its face neighbours outside it hold (a speck inside the liver becomes liver).

    Each works inside the bounding box of the labels concerned (with a one-voxel margin, so
    filling holes sees the same outside), never on int32 component maps of the whole volume.
    """
    if not spec:
        return labels
    labels = labels.copy()
    organ = spec.get("largest_component")
    if organ:
        mask = np.isin(labels, organ)
        box = _bounding_box(mask, margin=0)
        if box is not None:
            components, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
            if count > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                inside = labels[box]  # a view: clearing it clears labels
                inside[mask[box] & (components != int(sizes.argmax()))] = 0
    filled_labels = spec.get("fill_holes")
    if filled_labels:
        region = np.isin(labels, filled_labels)
        box = _bounding_box(region, margin=1)
        if box is not None:
            inside = labels[box]  # a view: filling it fills labels
            inside[ndimage.binary_fill_holes(region[box]) & (inside == 0)] = int(filled_labels[0])
    for inner, outer in (spec.get("inside") or {}).items():
        region = np.isin(labels, outer)
        box = _bounding_box(region, margin=1)
        if box is not None:
            region[box] = ndimage.binary_fill_holes(region[box])
        labels[(labels == int(inner)) & ~region] = 0
    smallest = spec.get("min_volume_ml") or {}
    if smallest and spacing is None:
        raise TransferSegError("postprocessing.min_volume_ml needs the label map's spacing")
    for label, below_ml in smallest.items():
        _drop_small_components(labels, int(label), float(below_ml) * 1000.0 / float(np.prod(spacing)))
    return labels


def _drop_small_components(labels: np.ndarray, label: int, below_voxels: float) -> None:
    """In place: each 26-connected component of ``label`` with fewer than ``below_voxels``
    voxels takes the commonest label among its face neighbours outside it (0 if it has none)."""
    mask = labels == label
    box = _bounding_box(mask, margin=1)
    if box is None:
        return
    inside = labels[box]  # a view: relabelling it relabels labels
    components, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    cross = ndimage.generate_binary_structure(3, 1)
    for index, where in enumerate(ndimage.find_objects(components), start=1):
        if sizes[index] >= below_voxels:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in where)
        component = components[grown] == index
        shell = ndimage.binary_dilation(component, cross) & ~component
        around = inside[grown][shell]
        around = around[around != label]
        inside[grown][component] = int(np.bincount(around).argmax()) if around.size else 0


def _bounding_box(mask: np.ndarray, margin: int):
    """Slices of the box holding every True voxel, grown by ``margin`` (clipped); None when empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def run(volume: Volume, model=DEFAULT_SEGMENTATION_MODEL, device: str = "auto", roi=None,
        progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
        return_probabilities: bool = False, method_options: Optional[dict] = None,
        deterministic: bool = False) -> Result:
    """Segment ``volume`` with ``model`` (a name, a path, or a :class:`LoadedModel`).

    The volume (or its ROI) is turned to the card's ``working_orientation`` and resampled to its
    ``working_spacing_mm`` (both optional), the card's method runs there, and its outputs come
    back onto the input's exact grid (probabilities linearly, slab by slab) before the labels
    are taken.  A card with neither field runs on the input grid as it is.  A heatmap stays on
    the working grid (with its exact geometry); its detections come back onto the input grid.

    Args:
        roi: ``(k0, j0, i0, k1, j1, i1)`` voxel box (half-open, array order); outputs stay full size.
        progress: ``callable(fraction, stage)``.
        cancel: a :class:`CancelToken`; cancelling raises :class:`~TransferSegLib.progress.Cancelled`.
        return_probabilities: also give the uint8 class probabilities on the input grid.
        method_options: per-run choices for the card's method, e.g. ``{"fusion": "staple"}``
            for a multi-view model.
        deterministic: fixed seeds and PyTorch's deterministic algorithms for the rest of the
            process (:func:`~TransferSegLib.provenance.use_deterministic`): the same input, model
            and machine then give byte-identical files.
    """
    started = now()
    if deterministic:
        use_deterministic()
    report = StageProgress(progress)
    timings = {}
    start = time.perf_counter()
    report(0.0, "loading model")
    target = resolve_device(device)
    # not the model's kind of scan (not CT in HU for a CT model): refused from its card, before the network loads
    scope_warnings = check_input(volume, model.card if isinstance(model, LoadedModel) else read_card(model))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    card = loaded.card
    method = get_method(loaded.method["name"])
    options = {k: v for k, v in (method_options or {}).items() if v is not None}
    check_options(loaded.method["name"], options, card["name"])
    timings["load_model"] = time.perf_counter() - start
    check_cancel(cancel)

    box = check_roi(roi, volume.shape) if roi is not None else None
    region = _crop(volume, box) if box is not None else volume
    warnings = scope_warnings + spacing_warnings(region, card) + _constant_warning(region)
    check_working_grid(region, card)
    start = time.perf_counter()
    report(0.02, "resampling")
    oriented, turn = to_orientation(region, card.get("working_orientation"))
    spacing = card.get("working_spacing_mm")
    working = to_spacing(oriented, spacing) if spacing else oriented
    timings["resample"] = time.perf_counter() - start
    check_cancel(cancel)

    start = time.perf_counter()
    output = method(MethodContext(working, loaded, target, report.sub(0.04, 0.9), cancel, options, native=oriented))
    timings["inference"] = time.perf_counter() - start
    timings.update({f"inference_{part}": seconds for part, seconds in output.timings.items()})
    check_cancel(cancel)

    back = _OnInputGrid(working, oriented, turn, box, volume.shape)
    result = _result_on_input(volume, region, card, output, back, return_probabilities, report, timings, cancel)
    result.warnings = warnings + result.warnings
    result.roi_kji = tuple(int(v) for v in box) if box is not None else None
    result.provenance = provenance(card, result.device, started, now(), deterministic)
    return result


def _result_on_input(volume: Volume, region: Volume, card: dict, output: MethodOutput, back: "_OnInputGrid",
                     return_probabilities: bool, report, timings: dict, cancel) -> Result:
    """The method's outputs as a :class:`Result` on the input's grid: labels (and probabilities)
    resampled back and post-processed, or the heatmap kept on the working grid and its detections
    placed on the input grid."""
    start = time.perf_counter()
    report(0.9, "resampling back")
    task = card.get("task", "segmentation")
    labels, probabilities, heatmap = None, None, None
    if task == "segmentation":
        labels, probabilities = back.labels(output, return_probabilities)
    else:
        heatmap = Volume(output.heatmap, back.working.spacing, back.working.directions, back.working.origin)
        labels = np.zeros(volume.shape, np.uint8)
    views = {name: back.values(values, fill=0) for name, values in output.views.items()}
    disagreement = back.values(output.disagreement, fill=0) if output.disagreement is not None else None
    timings["resample_back"] = time.perf_counter() - start
    check_cancel(cancel)

    start = time.perf_counter()
    report(0.95, "post-processing")
    implausible, detections = [], []
    if task == "segmentation":
        labels = postprocess(labels, card.get("postprocessing"), volume.spacing)
        labels, implausible = check_result(labels, region, card)  # no plausible organ: no labels, and why
    else:
        found = output.detections
        if found is None:  # a plain heatmap network: its peaks, on the working grid
            peaks = dict(card.get("peaks") or {})  # e.g. {"threshold": 0.2, "min_distance": [2, 8, 8]}: working voxels
            found = find_peaks(output.heatmap, back.working, **peaks)
        detections = [back.detection(d, back.working, volume) for d in found]
        detections += [back.detection(d, back.oriented, volume) for d in output.native_detections]
        detections.sort(key=lambda d: -d.confidence)
    timings["postprocess"] = time.perf_counter() - start
    report(1.0, "done")
    return Result(volume=volume, labels=labels, card=card, device=output.device, timings=timings,
                  probabilities=probabilities, heatmap=heatmap, detections=detections,
                  fallbacks=list(output.fallbacks), warnings=implausible, views=views, disagreement=disagreement,
                  method_summary=dict(output.summary), working=back.working if task == "heatmap" else None,
                  on_input=back if task == "heatmap" else None)


# float32 bytes per working voxel while a method runs: the image, each class's probability and the
# sliding window's weighted sums of them, and one more for temporaries
def _bytes_per_working_voxel(card: dict) -> int:
    return 4 * (3 + 2 * max(len(card["labels"]) + 1, 1))


def check_working_grid(volume: Volume, card: dict) -> tuple:
    """The shape of ``volume`` on the card's working grid, refused with :class:`TransferSegError` when it
    would not fit in the memory free now: from the header alone, before anything is resampled or
    allocated (an absurd spacing, e.g. 1e9 mm or 200 mm voxels, would otherwise die in the allocator)."""
    spacing = card.get("working_spacing_mm")
    header = Volume(np.zeros((1, 1, 1), np.float32), volume.spacing, volume.directions)
    oriented, turn = to_orientation(header, card.get("working_orientation"))
    shape = tuple(volume.shape[a] for a in turn.perm)
    working = grid_shape(shape, oriented.spacing, spacing) if spacing else shape
    needed = float(np.prod([float(n) for n in working])) * _bytes_per_working_voxel(card)
    available = available_memory_bytes()
    if needed > available:
        shown = "×".join(str(n) for n in working)
        raise TransferSegError(
            f"on the model's working grid ({' × '.join(f'{v:g}' for v in spacing or oriented.spacing)} mm) this "
            f"volume becomes {shown} voxels, which needs about {needed / 2**30:.3g} GiB but only "
            f"{available / 2**30:.1f} GiB of memory is free; check the voxel spacing in the header "
            f"({' × '.join(f'{v:g}' for v in volume.spacing)} mm, k × j × i), or crop the volume")
    return working


def spacing_warnings(volume: Volume, card: dict) -> list:
    """A warning when the input's voxel spacing lies far outside what the model was trained on.

    The card's ``trained_spacing_mm`` ({"min": [k, j, i], "max": [k, j, i]}, the range of the
    training cases' own spacings, in the working orientation) is the range; far outside is
    finer than half its minimum or coarser than twice its maximum.  Without it, within 2× of
    ``expected_spacing_mm``.  Spacings are compared in the working orientation's axis order.
    """
    trained = card.get("trained_spacing_mm")
    expected = card.get("expected_spacing_mm")
    if not trained and not expected:
        return []
    if trained:
        low, high = np.asarray(trained["min"], float) / 2.0, np.asarray(trained["max"], float) * 2.0
        what = f"the {' × '.join(f'{a:g}–{b:g}' for a, b in zip(trained['min'], trained['max']))} mm it was trained on"
    else:
        low, high = np.asarray(expected, float) / 2.0, np.asarray(expected, float) * 2.0
        what = f"its expected spacing {' × '.join(f'{v:g}' for v in expected)} mm"
    header = Volume(np.zeros((1, 1, 1), np.float32), volume.spacing, volume.directions)
    spacing = np.asarray(to_orientation(header, card.get("working_orientation"))[0].spacing)
    if np.any(spacing < low) or np.any(spacing > high):
        shown = " × ".join(f"{v:.3g}" for v in spacing)
        return [f"voxel spacing {shown} mm (k, j, i) is far outside {what} (more than 2× off); "
                "the results may be unreliable"]
    return []


def _constant_warning(volume: Volume) -> list:
    """A warning when every voxel has the same value (a blank export, a failed conversion): the result
    then says nothing about the patient.  Slab by slab, so a real image answers at its first slab."""
    first = volume.array.flat[0]
    for k in range(0, volume.shape[0], 16):
        if np.any(volume.array[k:k + 16] != first):
            return []
    return [f"every voxel of the input (or of its region of interest) is {float(first):g}: it holds no image, so "
            "the result is meaningless; check the file and how it was exported"]


def _crop(volume: Volume, box) -> Volume:
    """The ROI as a Volume of its own, on exactly the full volume's grid."""
    k0, j0, i0, k1, j1, i1 = box
    origin = volume.ijk_to_ras_points(np.array([[k0, j0, i0]], float))[0]
    return Volume(volume.array[k0:k1, j0:j1, i0:i1], volume.spacing, volume.directions, origin)


class _OnInputGrid:
    """Brings a method's outputs from the working grid back to the input's grid: resample (when
    the working grid differs), undo the working orientation, paste the ROI into the full shape."""

    def __init__(self, working: Volume, oriented: Volume, turn, box, shape):
        self.working, self.oriented, self.turn, self.box, self.shape = working, oriented, turn, box, tuple(shape)
        self.resampled = working.shape != oriented.shape

    def _place(self, values: np.ndarray, fill) -> np.ndarray:
        values = self.turn.undo(values)
        if self.box is None:
            return values
        k0, j0, i0, k1, j1, i1 = self.box
        full = np.full(values.shape[:-3] + self.shape, fill, dtype=values.dtype)
        full[..., k0:k1, j0:j1, i0:i1] = values
        return full

    def values(self, values: Optional[np.ndarray], fill) -> Optional[np.ndarray]:
        """Linear back (images, heatmaps, uint8 probabilities), in the values' own dtype."""
        if values is None:
            return None
        if self.resampled:
            values = back_to(values, self.working, self.oriented)
        return self._place(values, fill)

    def labels(self, output, with_probabilities: bool):
        """``(labels, probabilities or None)``: the argmax (or the method's ``decide``) of the
        probabilities brought back linearly, slab by slab (the method's own labels when nothing
        was resampled)."""
        probabilities = None
        if not self.resampled:
            labels = output.labels
            if with_probabilities:
                probabilities = output.probabilities
        else:
            if with_probabilities:
                probabilities = np.empty((output.probabilities.shape[0],) + self.oriented.shape, np.uint8)
            labels = back_to(output.probabilities, self.working, self.oriented, kind="argmax",
                             probabilities_out=probabilities, decide=output.decide)
        labels = self._place(labels, 0)
        if probabilities is not None:
            fill = np.zeros(probabilities.shape[0], np.uint8)
            fill[0] = 255  # outside the ROI everything is background
            probabilities = self.turn.undo(probabilities)
            if self.box is not None:
                full = np.broadcast_to(fill[:, None, None, None], fill.shape + self.shape).copy()
                k0, j0, i0, k1, j1, i1 = self.box
                full[:, k0:k1, j0:j1, i0:i1] = probabilities
                probabilities = full
        return labels, probabilities

    def detection(self, detection: Detection, grid: Volume, volume: Volume) -> Detection:
        """A detection found on ``grid`` (the working grid, or the oriented input region), placed on
        the input grid (through RAS)."""
        ras = grid.ijk_to_ras_points(np.asarray(detection.position_kji, float)[None])
        position = np.round(volume.ras_to_ijk_points(ras)[0]).astype(int)
        position = np.clip(position, 0, np.asarray(volume.shape) - 1)
        position_ras = volume.ijk_to_ras_points(position[None].astype(float))[0].round(3).tolist()
        return Detection([int(v) for v in position], position_ras, detection.confidence,
                         _box_between(detection.box_kji, grid, volume), detection.kind)
