"""Volume → Result: the one entry point that the CLI, the Slicer module and the tests call.

``run(volume, model)`` preprocesses as the model card says, runs the project's sliding-window
inferer, post-processes, and returns a :class:`Result` on the input's exact geometry.
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

from .models import DEFAULT_SEGMENTATION_MODEL, LoadedModel, load_model
from .preprocessing import preprocess
from .progress import CancelToken, ProgressCallback, StageProgress, check_cancel
from .volume import TransferSegError, Volume

__all__ = ["VIEW_NAMES", "Result", "run", "postprocess"]


VIEW_NAMES = ("axial", "coronal", "sagittal")


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
    heatmap: Optional[np.ndarray] = None
    roi_kji: Optional[tuple] = None
    detections: list = field(default_factory=list)  # heatmap task: TransferSegLib.heatmaps.Detection
    fallbacks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    views: dict = field(default_factory=dict)
    disagreement: Optional[np.ndarray] = None

    @property
    def segments(self) -> list:
        return self.card["labels"]

    @property
    def task(self) -> str:
        return self.card.get("task", "segmentation")

    def volumes_ml(self) -> dict:
        """Volume of each segment in millilitres."""
        voxel_ml = float(np.prod(self.volume.spacing)) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=256)
        return {seg["name"]: round(float(counts[seg["label"]]) * voxel_ml, 3) for seg in self.segments}

    def outputs(self) -> list:
        """Every file :meth:`write` writes, relative to its folder, in a fixed order (result.json last).

        Segmentation: segmentation.seg.nrrd, labelmap.nii.gz; heatmap task: heatmap.nii.gz,
        detections.json, detections.csv; then views/axial|coronal|sagittal.nii.gz and
        disagreement.nii.gz when set, overview.png, views.png when there are views, result.json.
        """
        unknown = set(self.views) - set(VIEW_NAMES)
        if unknown:
            raise ValueError(f"views must be named {', '.join(VIEW_NAMES)}; got {sorted(unknown)}")
        if self.task == "heatmap":
            names = ["heatmap.nii.gz", "detections.json", "detections.csv"]
        else:
            names = ["segmentation.seg.nrrd", "labelmap.nii.gz"]
        names += [f"views/{view}.nii.gz" for view in VIEW_NAMES if view in self.views]
        if self.disagreement is not None:
            names.append("disagreement.nii.gz")
        names.append("overview.png")
        if self.views:
            names.append("views.png")
        names.append("result.json")
        return names

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
            "fallbacks": self.fallbacks,
            "warnings": self.warnings,
            "files": self.outputs(),
        }

    def write(self, folder, input_path=None) -> dict:
        """Write every file of :meth:`outputs` into ``folder``, all of them or none; return {name: path}.

        The files are written into a staging folder and moved in only when every one is complete
        (:func:`~TransferSegLib.io.atomic_output_folder`): a failure or cancellation leaves
        ``folder`` as it was, other files in it are never touched, and files of an earlier run
        with the same names are replaced.  Refuses to overwrite ``input_path``.
        """
        from .io import atomic_output_folder, check_output_folder

        folder = check_output_folder(folder)
        names = self.outputs()
        if input_path is not None:
            source = Path(input_path).resolve()
            for name in names:
                if (folder / name).resolve() == source:
                    raise TransferSegError(
                        f"the output {folder / name} would overwrite the input; choose another output folder")
        with atomic_output_folder(folder, names) as staging:
            self._write_files(staging)
        return {name: folder / name for name in names}

    def _write_files(self, folder: Path) -> None:
        from .io import atomic_output, save_labelmap, save_scalar, save_segmentation
        from .render import save_gallery_png, save_overview_png

        start = time.perf_counter()
        label_names = {seg["label"]: seg["name"] for seg in self.segments}
        if self.task == "heatmap":
            save_scalar(self.heatmap, self.volume, folder / "heatmap.nii.gz")
            rows = [d.to_dict() for d in self.detections]
            with atomic_output(folder / "detections.json") as tmp:
                tmp.write_text(json.dumps({"model": self.card["name"], "detections": rows}, indent=2) + "\n",
                               encoding="utf-8")
            with atomic_output(folder / "detections.csv") as tmp:
                lines = ["rank,confidence,k,j,i,r_mm,a_mm,s_mm,k0,j0,i0,k1,j1,i1"]
                for n, d in enumerate(self.detections, 1):
                    lines.append(",".join(str(v) for v in [n, f"{d.confidence:.6g}", *d.position_kji,
                                                          *(d.position_ras or ["", "", ""]), *d.box_kji]))
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            save_segmentation(self.labels, self.volume, folder / "segmentation.seg.nrrd", self.segments)
            save_labelmap(self.labels, self.volume, folder / "labelmap.nii.gz")
        for view in VIEW_NAMES:
            if view in self.views:
                save_scalar(self.views[view], self.volume, folder / "views" / f"{view}.nii.gz")
        if self.disagreement is not None:
            save_scalar(self.disagreement, self.volume, folder / "disagreement.nii.gz")
        if self.task == "heatmap":
            save_overview_png(self.volume, folder / "overview.png", heatmap=self.heatmap,
                              boxes=[{"box_kji": d.box_kji, "kind": "detection"} for d in self.detections[:10]],
                              title=f"{self.card['name']} — {len(self.detections)} detection(s)")
        else:
            save_overview_png(self.volume, folder / "overview.png", labels=self.labels, label_names=label_names,
                              title=f"{self.card['name']} — " + ", ".join(
                                  f"{k} {v:.1f} mL" for k, v in self.volumes_ml().items()))
        if self.views:
            rows = []
            for view in VIEW_NAMES:
                if view not in self.views:
                    continue
                probabilities = np.asarray(self.views[view])
                if probabilities.ndim == 4:  # class probabilities: show the view's own label map
                    rows.append(dict(volume=self.volume, labels=probabilities.argmax(axis=0).astype(np.uint8),
                                     label_names=label_names, title=f"{view} network"))
                else:
                    rows.append(dict(volume=self.volume, heatmap=probabilities, title=f"{view} network"))
            if self.disagreement is not None:
                rows.append(dict(volume=self.volume, heatmap=self.disagreement, title="view disagreement"))
            save_gallery_png(rows, folder / "views.png")
        self.timings["write"] = time.perf_counter() - start
        with atomic_output(folder / "result.json") as tmp:
            tmp.write_text(json.dumps(self.summary(), indent=2) + "\n", encoding="utf-8")


def postprocess(labels: np.ndarray, spec: Optional[dict]) -> np.ndarray:
    """Card-driven clean-up of a label map (in place on a copy).

    ``{"largest_component": [1, 2]}`` keeps only the largest 26-connected component of the union
    of those labels (e.g. the liver with its tumors) and clears the rest of them;
    ``{"inside": {"2": [1, 2]}}`` keeps label 2 only where it lies inside the filled region of
    labels {1, 2}.
    """
    if not spec:
        return labels
    labels = labels.copy()
    organ = spec.get("largest_component")
    if organ:
        mask = np.isin(labels, organ)
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            labels[mask & (components != int(sizes.argmax()))] = 0
    for inner, outer in (spec.get("inside") or {}).items():
        region = ndimage.binary_fill_holes(np.isin(labels, outer))
        labels[(labels == int(inner)) & ~region] = 0
    return labels


def run(volume: Volume, model=DEFAULT_SEGMENTATION_MODEL, device: str = "auto", roi=None,
        progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
        return_probabilities: bool = False) -> Result:
    """Segment ``volume`` with ``model`` (a name, a path, or a :class:`LoadedModel`).

    Args:
        roi: ``(k0, j0, i0, k1, j1, i1)`` voxel box (half-open, array order); outputs stay full size.
        progress: ``callable(fraction, stage)``.
        cancel: a :class:`CancelToken`; cancelling raises :class:`~TransferSegLib.progress.Cancelled`.
    """
    from .inference import resolve_device, sliding_window_inference

    report = StageProgress(progress)
    timings = {}
    start = time.perf_counter()
    report(0.0, "loading model")
    target = resolve_device(device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    card = loaded.card
    timings["load_model"] = time.perf_counter() - start
    check_cancel(cancel)

    warnings = []
    expected = card.get("expected_spacing_mm")
    if expected:
        ratio = np.asarray(volume.spacing) / np.asarray(expected, dtype=float)
        if np.any(ratio > 2.0) or np.any(ratio < 0.5):
            warnings.append(
                f"voxel spacing {tuple(round(s, 3) for s in volume.spacing)} mm (k, j, i) differs more than 2× from "
                f"the model's training spacing {tuple(expected)}; results may be less accurate"
            )

    start = time.perf_counter()
    report(0.02, "preprocessing")
    array = preprocess(volume.array, card.get("preprocessing"))
    timings["preprocess"] = time.perf_counter() - start
    check_cancel(cancel)

    start = time.perf_counter()
    settings = dict(card.get("inference") or {})
    task = card.get("task", "segmentation")
    result = sliding_window_inference(
        array, loaded.network, patch_size=tuple(card["patch_size"]),
        num_classes=len(card["labels"]) + 1 if task == "segmentation" else 1,
        overlap=settings.get("overlap", 0.5), blend=settings.get("blend", "gaussian"),
        batch_size=settings.get("batch_size", 2), device=target,
        activation=settings.get("activation", "softmax" if task == "segmentation" else "none"),
        return_probabilities=return_probabilities, roi=roi,
        progress=report.sub(0.05, 0.95), cancel=cancel,
    )
    timings["inference"] = time.perf_counter() - start
    check_cancel(cancel)

    start = time.perf_counter()
    report(0.95, "post-processing")
    labels = result.labels if result.labels is not None else np.zeros(volume.shape, np.uint8)  # heatmap task
    labels = postprocess(labels, card.get("postprocessing"))
    detections = []
    if task == "heatmap":
        from .heatmaps import find_peaks

        peaks = dict(card.get("peaks") or {})  # e.g. {"threshold": 0.2, "min_distance": [2, 8, 8]}
        detections = find_peaks(result.heatmap, volume, **peaks)
    timings["postprocess"] = time.perf_counter() - start
    report(1.0, "done")
    return Result(volume=volume, labels=labels, card=card, device=str(result.device), timings=timings,
                  probabilities=result.probabilities, heatmap=getattr(result, "heatmap", None),
                  roi_kji=tuple(int(v) for v in roi) if roi is not None else None,
                  detections=detections, fallbacks=list(result.fallbacks), warnings=warnings)
