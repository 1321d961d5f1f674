"""Writing a set of phantom cases and their gallery (the ``transferseg phantom`` command)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, atomic_output_folder
from ..io import save_labelmap, save_volume
from ..labels import CT_LABEL_NAMES
from ..volume import TransferSegError, Volume
from .common import check_seed
from .ct import ct_phantom
from .dbt import dbt_phantom
from .shapes import SHAPES_2D, SHAPES_3D, shapes_2d, shapes_3d

PHANTOM_KINDS = ("ct", "dbt", "shapes")
_GALLERY_ROWS = 12


def write_phantoms(kind: str, out_dir, seed: int, count: int = 1, progress=None) -> list:
    """Write ``count`` phantom cases of ``kind`` ("ct", "dbt" or "shapes") and a gallery.png.

    Case ``n`` uses seed ``seed + n``, so any case can be regenerated on its own.

    * ct: ``ct_NNN.nii.gz`` (HU) and ``ct_NNN_label.nii.gz`` (0 background, 1 liver, 2 tumor);
    * dbt: ``dbt_NNN.nii.gz`` and ``dbt_NNN_boxes.json`` (``{"volume", "seed", "lesions": [...]}``
      with the boxes of :func:`dbt_phantom`);
    * shapes: ``shapes3d_NNN.nii.gz`` / ``shapes3d_NNN_label.nii.gz`` (one 48³ volume each) and
      one stack of 16 × ``count`` 2D images, ``shapes2d.nii.gz`` / ``shapes2d_label.nii.gz``
      (image m is slice k = m), plus ``shapes_classes.json`` naming the label values.
      Shapes are stored with 1 mm spacing and LPS directions, so that the axial view shows
      the array as stored.

    ``gallery.png`` shows three orthogonal slices of each case (the first 12) with its labels
    or boxes.  The files are written all together or not at all
    (:func:`~TransferSegLib.atomic.atomic_output_folder`: an interrupted run leaves ``out_dir`` as
    it was).  ``progress(fraction, stage)`` is called after each case.  Returns the written paths.
    """
    if kind not in PHANTOM_KINDS:
        raise TransferSegError(f"unknown phantom kind {kind!r}; choose one of {', '.join(PHANTOM_KINDS)}")
    seed = check_seed(seed)
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise TransferSegError(f"count must be a whole number ≥ 1; got {count!r}")
    count = int(count)
    with atomic_output_folder(out_dir, _phantom_names(kind, count)) as staging:
        written = _write_phantom_files(kind, staging, seed, count, progress)
    return [Path(out_dir) / path.relative_to(staging) for path in written]


def _phantom_names(kind: str, count: int) -> list:
    """The files :func:`write_phantoms` writes, in its order."""
    per_case = {"ct": ("ct_{:03d}.nii.gz", "ct_{:03d}_label.nii.gz"),
                "dbt": ("dbt_{:03d}.nii.gz", "dbt_{:03d}_boxes.json"),
                "shapes": ("shapes3d_{:03d}.nii.gz", "shapes3d_{:03d}_label.nii.gz")}[kind]
    names = [pattern.format(n) for n in range(count) for pattern in per_case]
    if kind == "shapes":
        names += ["shapes2d.nii.gz", "shapes2d_label.nii.gz", "shapes_classes.json"]
    return names + ["gallery.png"]


def _write_phantom_files(kind: str, out: Path, seed: int, count: int, progress) -> list:
    # matplotlib: the Slicer module imports the phantoms before its first-use installs bring matplotlib
    from ..render import save_gallery_png

    written, cases = [], []

    def report(done: int, stage: str) -> None:
        if progress is not None:
            progress(done / (count + 1), stage)

    def write_json(path: Path, data) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        written.append(path)

    for n in range(count):
        case_seed = seed + n
        if kind == "ct":
            volume, labels = ct_phantom(case_seed)
            written.append(save_volume(volume, out / f"ct_{n:03d}.nii.gz"))
            written.append(save_labelmap(labels, volume, out / f"ct_{n:03d}_label.nii.gz"))
            cases.append({"volume": volume, "labels": labels, "title": f"ct_{n:03d} (seed {case_seed})",
                          "label_names": CT_LABEL_NAMES})
        elif kind == "dbt":
            volume, boxes = dbt_phantom(case_seed)
            name = f"dbt_{n:03d}.nii.gz"
            written.append(save_volume(volume, out / name))
            write_json(out / f"dbt_{n:03d}_boxes.json", {"volume": name, "seed": case_seed, "lesions": boxes})
            cases.append({"volume": volume, "boxes": boxes, "title": f"dbt_{n:03d} (seed {case_seed})"})
        else:
            images, labels = shapes_3d(case_seed, 1)
            volume = Volume(images[0], spacing=(1.0, 1.0, 1.0), directions=np.diag([-1.0, -1.0, 1.0]))
            written.append(save_volume(volume, out / f"shapes3d_{n:03d}.nii.gz"))
            written.append(save_labelmap(labels[0], volume, out / f"shapes3d_{n:03d}_label.nii.gz"))
            cases.append({"volume": volume, "labels": labels[0], "title": f"shapes3d_{n:03d} (seed {case_seed})",
                          "label_names": dict(enumerate(SHAPES_3D, start=1))})
        report(n + 1, f"{kind} case {n + 1}/{count}")

    if kind == "shapes":
        images, labels = shapes_2d(seed, 16 * count)
        stack = Volume(images, spacing=(1.0, 1.0, 1.0), directions=np.diag([-1.0, -1.0, 1.0]))
        written.append(save_volume(stack, out / "shapes2d.nii.gz"))
        written.append(save_labelmap(labels, stack, out / "shapes2d_label.nii.gz"))
        write_json(out / "shapes_classes.json", {
            "shapes2d": {str(v): name for v, name in enumerate(SHAPES_2D, start=1)},
            "shapes3d": {str(v): name for v, name in enumerate(SHAPES_3D, start=1)},
        })
    gallery = out / "gallery.png"
    save_gallery_png(cases[:_GALLERY_ROWS], gallery)
    written.append(gallery)
    report(count + 1, "gallery")
    return written
