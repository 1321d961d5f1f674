"""How the CT working spacing was chosen: the Dice ceiling each grid allows, against its cost.

For clinical-grid CT phantoms (512 × 512, 0.6–1.0 mm pixels), each candidate working spacing is
scored by the best segmentation a model on that grid could give: the true labels as one-hot
probabilities, taken to the working grid with the pipeline's own resampling (antialiased), and
brought back with the pipeline's ``back_to(..., kind="argmax")``.  What is lost is lost to the
grid, whatever the network.  The cost is the number of working voxels a 512 × 512 × 100 CT
(0.7 × 0.7 × 2.5 mm) becomes, which is what a network's time scales with.

    python bench/working_spacing.py [--cases 3]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.resample import back_to, grid_shape, to_spacing

from common import liver_and_tumor, pooled_tumor_dice


CANDIDATES = ([2.0, 1.0, 1.0], [3.0, 1.5, 1.5], [3.0, 2.0, 2.0], [4.0, 2.5, 2.5], [4.5, 4.4, 4.4])


def ceiling(volume, labels, spacing) -> dict:
    """The :func:`common.liver_and_tumor` scores of the one-hot truth through the working grid and back."""
    onehot = np.stack([(labels == c).astype(np.float32) for c in range(3)])
    working = [to_spacing(volume.with_array(channel), spacing) for channel in onehot]
    encoded = np.stack([np.round(w.array * 255).astype(np.uint8) for w in working])
    return liver_and_tumor(back_to(encoded, working[0], volume, kind="argmax"), labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    args = parser.parse_args()
    rows = {tuple(s): [] for s in CANDIDATES}
    for n in range(args.cases):
        tic = time.perf_counter()
        volume, labels = ct_phantom(6000 + n, shape=(80, 512, 512), tumors=4)
        print(f"phantom {6000 + n}: spacing {tuple(round(s, 2) for s in volume.spacing)} mm, "
              f"{(labels == 2).sum()} tumor voxels ({time.perf_counter() - tic:.0f} s)", flush=True)
        for spacing in CANDIDATES:
            rows[tuple(spacing)].append(ceiling(volume, labels, spacing))
    clinical = (100, 512, 512)
    print()
    print("working spacing (k, j, i) mm | liver Dice ceiling | tumor Dice ceiling (global) | voxels of a 512²×100 CT")
    for spacing in CANDIDATES:
        scores = rows[tuple(spacing)]
        voxels = int(np.prod(grid_shape(clinical, (2.5, 0.7, 0.7), spacing)))
        print(f"{' × '.join(f'{v:g}' for v in spacing):>27} | {min(s['liver'] for s in scores):.3f} (worst) | "
              f"{pooled_tumor_dice(scores):.3f}{'':>21} | {voxels / 1e6:5.2f} M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
