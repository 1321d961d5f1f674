"""`Volume`: a 3D image array with its exact geometry, and the checks every input passes.

Conventions (DESIGN.md):

* ``array`` is float32 in (k, j, i) = (slice, row, column) order, as SimpleITK's
  ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` return it.
* ``spacing`` is in millimetres, in the same (k, j, i) order as the array axes.
* Geometry is stored the way Slicer's ``vtkMRMLVolumeNode`` stores it: ``origin`` (RAS, mm),
  ``directions`` (3×3 RAS, column n is the unit vector of IJK axis n, i.e. column 0 is the
  i axis = array axis 2) and ``spacing``.  ``ijk_to_ras`` (4×4) is built from them, so the
  three parts are written back to a file bit for bit, never re-derived by division.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TransferSegError", "Volume", "anatomical_axes", "label_counts", "orientation_name"]


class TransferSegError(Exception):
    """A problem with the user's input or setup, phrased so that a clinician can act on it.

    The CLI prints the message as one line and exits with status 2.
    """


def describe_shape(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


# On DᵀD − I: far above float32 rounding and headers' 6-digit direction cosines, far below a real shear or scale.
_ORTHONORMAL_TOLERANCE = 1e-4
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# No scan is a light-year across; beyond this a spacing or origin overflows a NIfTI's float32 fields (and ±inf mL).
GEOMETRY_LIMIT_MM = 1e30


def direction_problem(directions: np.ndarray) -> str | None:
    """What keeps a 3×3 matrix (column n = IJK axis n) from being a rotation or reflection, in words; None if
    it is one.  A shear or a scale in a direction matrix is silently wrong geometry for every voxel."""
    d = np.asarray(directions, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        return "it holds values that are not finite numbers"
    gram = d.T @ d
    lengths = np.sqrt(np.diag(gram))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if abs(gram[a, b]) > _ORTHONORMAL_TOLERANCE * max(lengths[a] * lengths[b], 1.0):
            angle = np.degrees(np.arccos(np.clip(gram[a, b] / max(lengths[a] * lengths[b], 1e-300), -1.0, 1.0)))
            return f"its {'ijk'[a]} and {'ijk'[b]} axes are {angle:.4g}° apart, not 90° (a shear)"
    for n in range(3):
        if abs(gram[n, n] - 1.0) > _ORTHONORMAL_TOLERANCE:
            return f"its {'ijk'[n]} axis has length {lengths[n]:.6g}, not 1 (a scale)"
    return None


def check_geometry(spacing: np.ndarray, directions: np.ndarray, origin: np.ndarray) -> None:
    if spacing.shape != (3,):
        raise TransferSegError(f"spacing must have 3 values (k, j, i); got {spacing.tolist()}")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise TransferSegError(
            f"voxel spacing {tuple(float(s) for s in spacing)} mm (k, j, i) is zero, negative or not a "
            "number; fix the spacing in the image header (e.g. in 3D Slicer's Volumes module) and save it again"
        )
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise TransferSegError("the direction (orientation) matrix is not a finite 3×3 matrix; fix the image header")
    if abs(np.linalg.det(directions)) < 1e-6:
        raise TransferSegError(
            "the direction (orientation) matrix is singular: two image axes point the same way; "
            "fix the orientation in the image header"
        )
    problem = direction_problem(directions)
    if problem:
        raise TransferSegError(
            f"the direction (orientation) matrix is not orthonormal: {problem}; TransferSeg needs perpendicular "
            "unit axes: resample the image onto a regular grid (e.g. in 3D Slicer) or fix the orientation in the "
            "image header"
        )
    if np.any(spacing > GEOMETRY_LIMIT_MM):
        raise TransferSegError(
            f"voxel spacing {tuple(float(s) for s in spacing)} mm (k, j, i) is beyond {GEOMETRY_LIMIT_MM:g} mm: "
            "that describes no scan, and a NIfTI file cannot store it; fix the spacing in the image header"
        )
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise TransferSegError("the image origin is not three finite numbers; fix the image header")
    if np.any(np.abs(origin) > GEOMETRY_LIMIT_MM):
        raise TransferSegError(
            f"the image origin {tuple(float(o) for o in origin)} mm is beyond ±{GEOMETRY_LIMIT_MM:g} mm: that "
            "describes no scan, and a NIfTI file cannot store it; fix the origin in the image header"
        )


def as_float32(array: np.ndarray, copy: bool = False) -> np.ndarray:
    """A 3D ``array`` as float32 (always a new array when ``copy``).  Finite values beyond float32's range
    are refused rather than cast to ±inf, which a later check would call infinite."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        beyond = 0
        for k in range(0, array.shape[0], 16):  # slab by slab: no full-size temporary
            slab = array[k:k + 16]
            beyond += int(np.count_nonzero(np.isfinite(slab) & (np.abs(slab) > _FLOAT32_MAX)))
        if beyond:
            raise TransferSegError(
                f"{beyond} voxel(s) are beyond ±3.4e38, outside the float32 range TransferSeg computes in; "
                "rescale the image (e.g. to HU or to 0–1) and try again"
            )
    with np.errstate(over="ignore"):
        return array.astype(np.float32, copy=copy)


@dataclass(eq=False)
class Volume:
    """A 3D scalar image with its geometry.

    Args:
        array: voxel values, axes (k, j, i); converted to float32 (CT stays in HU).
        spacing: voxel size in mm, in array-axis order (k, j, i).
        directions: 3×3 RAS direction cosines; column n is IJK axis n (n = 0 is i, the last array axis).
        origin: RAS position (mm) of the centre of voxel (0, 0, 0).
        meta: what the file said about the image beyond its voxels, as JSON-ready values (e.g. a DICOM
            mammography object's ``{"laterality": "R", "view": "CC", ...}``); empty for most files.

    Use :meth:`from_ijk_to_ras` to build one from a 4×4 matrix (e.g. a Slicer node's IJKToRAS).
    """

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    directions: np.ndarray = field(default_factory=lambda: np.eye(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise TransferSegError(
                f"input is {array.ndim}D ({describe_shape(array.shape)}); TransferSeg needs a 3D volume"
            )
        if 0 in array.shape:
            raise TransferSegError(f"the volume has a zero-size axis ({describe_shape(array.shape)}); it holds no voxels")
        self.array = as_float32(array)
        spacing = np.asarray(self.spacing, dtype=np.float64).reshape(-1)
        directions = np.asarray(self.directions, dtype=np.float64)
        origin = np.asarray(self.origin, dtype=np.float64).reshape(-1)
        check_geometry(spacing, directions, origin)
        self.spacing = tuple(float(s) for s in spacing)
        self.directions = directions.copy()
        self.origin = origin.copy()
        self.meta = dict(self.meta or {})

    # --- geometry -----------------------------------------------------------------------
    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build a Volume from a 4×4 IJK→RAS matrix (IJK = (i, j, k) = reversed array axes)."""
        m = np.asarray(ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4):
            raise TransferSegError(f"IJK→RAS must be a 4×4 matrix; got shape {m.shape}")
        norms_ijk = np.linalg.norm(m[:3, :3], axis=0)
        if np.any(norms_ijk == 0) or not np.all(np.isfinite(norms_ijk)):
            raise TransferSegError("IJK→RAS has a zero or non-finite column: the voxel spacing is zero")
        problem = direction_problem(m[:3, :3] / norms_ijk)
        if problem:
            raise TransferSegError(
                f"IJK→RAS is not a rotation times the voxel spacing: {problem}; TransferSeg needs a volume on a "
                "regular grid: harden the transform and resample the volume first (e.g. in 3D Slicer)"
            )
        return cls(array, spacing=tuple(norms_ijk[::-1]), directions=m[:3, :3] / norms_ijk, origin=m[:3, 3])

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous (i, j, k, 1) voxel indices to RAS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.directions * np.asarray(self.spacing[::-1])
        m[:3, 3] = self.origin
        return m

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new Volume on exactly this geometry (the array must have the same shape)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise TransferSegError(
                f"array shape {describe_shape(array.shape)} does not match the volume's {describe_shape(self.shape)}"
            )
        return Volume(array, self.spacing, self.directions, self.origin, self.meta)

    def ijk_to_ras_points(self, kji: np.ndarray) -> np.ndarray:
        """RAS positions (N, 3) of voxel indices given in array order (N, 3) = (k, j, i)."""
        kji = np.atleast_2d(np.asarray(kji, dtype=np.float64))
        ijk1 = np.concatenate([kji[:, ::-1], np.ones((len(kji), 1))], axis=1)
        return (ijk1 @ self.ijk_to_ras.T)[:, :3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (N, 3) in array order (k, j, i) of RAS points (N, 3)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        ras1 = np.concatenate([ras, np.ones((len(ras), 1))], axis=1)
        ijk = (ras1 @ np.linalg.inv(self.ijk_to_ras).T)[:, :3]
        return ijk[:, ::-1]

    def check_finite(self) -> None:
        """Raise if any voxel is NaN or ±inf (checked slab by slab, no full-size temporary)."""
        for k in range(0, self.array.shape[0], 16):
            slab = self.array[k:k + 16]
            if not np.isfinite(slab).all():
                bad = int((~np.isfinite(self.array)).sum())
                raise TransferSegError(
                    f"the volume has {bad} voxel(s) that are NaN or infinite; "
                    "repair or mask them (e.g. set them to the background value) and try again"
                )

    def summary(self) -> dict:
        """Shape, spacing, orientation, intensity range and memory size, for `transferseg info`."""
        a = self.array
        return {
            "shape_kji": list(self.shape),
            "spacing_kji_mm": [round(s, 6) for s in self.spacing],
            "orientation": orientation_name(self.directions),
            "origin_ras_mm": [round(float(o), 4) for o in self.origin],
            "extent_kji_mm": [round(n * s, 2) for n, s in zip(self.shape, self.spacing)],
            "intensity_min": float(a.min()),
            "intensity_max": float(a.max()),
            "intensity_mean": float(a.mean(dtype=np.float64)),
            "memory_mib": round(self.nbytes / 2**20, 2),
            **({"meta": self.meta} if self.meta else {}),  # e.g. a DBT's laterality and view
        }


_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))


def anatomical_axes(directions: np.ndarray) -> dict:
    """Which array axis (0 = k, 1 = j, 2 = i) lies closest to each patient axis.

    Returns ``{"R": axis, "A": axis, "S": axis}`` decided from the direction matrix, so that
    the axial view (normal S), coronal (normal A) and sagittal (normal R) are anatomical
    whatever the acquisition order.  Ties are broken by assigning the most aligned pair first.
    """
    d = np.abs(np.asarray(directions, dtype=np.float64))  # rows R, A, S; columns i, j, k
    result, used_rows, used_cols = {}, set(), set()
    for flat in np.argsort(-d, axis=None):
        row, col = divmod(int(flat), 3)
        if row in used_rows or col in used_cols:
            continue
        used_rows.add(row)
        used_cols.add(col)
        result["RAS"[row]] = 2 - col  # IJK column n is array axis 2 - n
    return result


def orientation_name(directions: np.ndarray) -> str:
    """E.g. ``"LPS axial"`` or ``"RAS-ish coronal (oblique)"``.

    The three letters are the directions the i, j and k axes point to (Slicer/ITK convention);
    the plane is the one the slices (array axis 0) are cut in.
    """
    d = np.asarray(directions, dtype=np.float64)
    axes = anatomical_axes(d)
    letters = []
    for col in range(3):  # i, j, k
        array_axis = 2 - col
        patient = next(p for p, a in axes.items() if a == array_axis)
        row = "RAS".index(patient)
        letters.append(_AXIS_LETTERS[row][0 if d[row, col] > 0 else 1])
    oblique = not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-6)
    plane = {"S": "axial", "A": "coronal", "R": "sagittal"}[next(p for p, a in axes.items() if a == 0)]
    code = "".join(letters)
    return f"{code}-ish {plane} (oblique)" if oblique else f"{code} {plane}"


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per value (at least 256 counts) of a label map of whole numbers ≥ 0, counted slab by
    slab: ``np.bincount`` of the whole map would first make an int64 copy of it (630 MB for a
    300 × 512 × 512 CT)."""
    labels = np.asarray(labels)
    if labels.ndim == 0 or not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise TransferSegError(f"a label map holds whole numbers; got {labels.dtype} of shape {labels.shape}")
    counts = np.zeros(256, np.int64)
    rows = max(1, (1 << 22) // max(int(np.prod(labels.shape[1:])), 1))
    for k in range(0, labels.shape[0], rows):
        part = np.bincount(labels[k:k + rows].ravel(), minlength=256)  # raises on negative values
        if part.size > counts.size:
            counts = np.concatenate([counts, np.zeros(part.size - counts.size, np.int64)])
        counts[:part.size] += part
    return counts


# --- regions of interest -----------------------------------------------------------------
def roi_from_ras(volume: "Volume", ras_min, ras_max) -> tuple:
    """The (k0, j0, i0, k1, j1, i1) half-open box of voxels enclosing a RAS box (mm), clipped to the volume.

    The 8 corners of the RAS box are mapped to continuous voxel indices; the box runs from the
    floor of their minimum to the ceiling of their maximum (inclusive), so every voxel whose
    centre lies in the RAS box is inside it, whatever the volume's orientation.
    """
    lo = np.asarray(ras_min, dtype=np.float64).reshape(-1)
    hi = np.asarray(ras_max, dtype=np.float64).reshape(-1)
    if lo.shape != (3,) or hi.shape != (3,) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise TransferSegError(f"a RAS box needs two finite (R, A, S) points; got {ras_min!r} and {ras_max!r}")
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    # a box far larger than the volume (1e20 mm) is the volume's own bounding box: the same voxels,
    # and indices that stay finite integers
    grid = np.array([[k, j, i] for k in (-1, volume.shape[0]) for j in (-1, volume.shape[1])
                     for i in (-1, volume.shape[2])], float)
    extent = volume.ijk_to_ras_points(grid)
    low, high = extent.min(axis=0), extent.max(axis=0)
    outside = np.any(hi < low) or np.any(lo > high)
    box_lo, box_hi = np.clip(lo, low, high), np.clip(hi, low, high)
    corners = np.array([[(box_lo, box_hi)[a][0], (box_lo, box_hi)[b][1], (box_lo, box_hi)[c][2]]
                        for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    kji = volume.ras_to_ijk_points(corners)
    start = np.floor(kji.min(axis=0) + 1e-6).astype(np.int64)  # 1e-6: corners exactly on a voxel centre
    stop = np.ceil(kji.max(axis=0) - 1e-6).astype(np.int64) + 1
    shape = np.asarray(volume.shape)
    start, stop = np.clip(start, 0, shape), np.clip(stop, 0, shape)
    if outside or np.any(stop <= start):
        raise TransferSegError(
            f"the RAS box from ({', '.join(f'{v:g}' for v in lo)}) to ({', '.join(f'{v:g}' for v in hi)}) mm does not "
            "overlap the volume; place the region of interest over the image"
        )
    return tuple(int(v) for v in start) + tuple(int(v) for v in stop)


def check_roi(roi, shape) -> tuple:
    """``roi`` as a (k0, j0, i0, k1, j1, i1) tuple of whole voxel indices inside ``shape``, or a clear error."""
    try:
        box = tuple(int(v) for v in roi)
        whole = all(float(v) == b for v, b in zip(roi, box))
    except (TypeError, ValueError, OverflowError):
        box, whole = (), True
    if len(box) != 6:
        raise TransferSegError(f"roi must be (k0, j0, i0, k1, j1, i1); got {roi!r}")
    if not whole:
        raise TransferSegError(f"roi ({', '.join(f'{float(v):g}' for v in roi)}) (k0, j0, i0, k1, j1, i1) must be whole "
                               "voxel indices")
    start, stop = box[:3], box[3:]
    if any(a < 0 or b > n or b <= a for a, b, n in zip(start, stop, shape)):
        raise TransferSegError(
            f"roi {box} (k0, j0, i0, k1, j1, i1) is empty or reaches outside the volume of {describe_shape(shape)} voxels"
        )
    return box
