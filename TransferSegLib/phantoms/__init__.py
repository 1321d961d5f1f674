"""Synthetic, seed-deterministic data: a CT abdomen, a DBT breast and the ACS proof-of-concept shapes.

Every generator takes a ``seed`` and draws only from ``np.random.default_rng`` streams derived
from it (no global random state), so the same seed always gives the same voxels and geometry.
The data are meant to be hard enough that a threshold does not solve them:

* :func:`ct_phantom` — an axial abdominal CT in HU with labels 0 background, 1 liver,
  2 liver tumor (the project's CT label convention).  Liver, spleen, kidney and muscle HU
  overlap; tumors have low contrast; noise is spatially correlated; thick slices average the
  anatomy (partial volume).
* :func:`dbt_phantom` — a Digital Breast Tomosynthesis volume: compressed breast, power-law
  (1/f^β, β ≈ 3) fibroglandular texture, masses and calcification clusters with 3D boxes,
  and limited-angle out-of-plane blur.
* :func:`shapes_2d`, :func:`shapes_3d` — the ACS convolutions paper's proof-of-concept data
  (Section IV-A): 2D circles, squares and triangles; 3D spheres, cubes, cylinders, cones and
  pyramids on textured backgrounds.

:func:`write_phantoms` writes a set of cases and a ``gallery.png`` (the ``transferseg phantom``
command).

Layout: :mod:`.ct` (the scan, contrast phases, tumors, reconstruction) with :mod:`.anatomy` (one
painter per organ), :mod:`.tissues` and :mod:`.geometry` (shapes on a fine grid); :mod:`.dbt`;
:mod:`.regions` (head, neck, pelvis, legs: no liver); :mod:`.shapes`; :mod:`.files` (writing cases and
a gallery); :mod:`.common` (random streams, argument checks, noise).
"""
from ..labels import CT_LABEL_NAMES
from .ct import CT_COVERAGE, CT_DEFAULT_SHAPE, CT_PHASES, TUMOR_KINDS, ct_phantom
from .dbt import DBT_DEFAULT_SHAPE, dbt_phantom
from .files import PHANTOM_KINDS, write_phantoms
from .regions import CT_REGIONS, region_phantom
from .shapes import SHAPES_2D, SHAPES_3D, shapes_2d, shapes_3d
from .tissues import CT_TISSUE_NAMES

__all__ = [
    "CT_COVERAGE",
    "CT_DEFAULT_SHAPE",
    "CT_LABEL_NAMES",
    "CT_PHASES",
    "CT_REGIONS",
    "CT_TISSUE_NAMES",
    "DBT_DEFAULT_SHAPE",
    "PHANTOM_KINDS",
    "SHAPES_2D",
    "SHAPES_3D",
    "TUMOR_KINDS",
    "ct_phantom",
    "dbt_phantom",
    "region_phantom",
    "shapes_2d",
    "shapes_3d",
    "write_phantoms",
]
