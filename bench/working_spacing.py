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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TransferSegLib.metrics import dice  # noqa: E402
from TransferSegLib.phantoms import ct_phantom  # noqa: E402
from TransferSegLib.resample import back_to, grid_shape, to_spacing  # noqa: E402


CANDIDATES = ([2.0, 1.0, 1.0], [3.0, 1.5, 1.5], [3.0, 2.0, 2.0], [4.0, 2.5, 2.5], [4.5, 4.4, 4.4])


def ceiling(volume, labels, spacing) -> tuple:
    """(liver Dice, tumor overlap ×2, tumor voxels predicted + true) of the one-hot truth through the
    working grid and back; the last two pool over cases into the global tumor Dice."""
    onehot = np.stack([(labels == c).astype(np.float32) for c in range(3)])
    working = [to_spacing(volume.with_array(channel), spacing) for channel in onehot]
    encoded = np.stack([np.round(w.array * 255).astype(np.uint8) for w in working])
    back = back_to(encoded, working[0], volume, kind="argmax")
    tumor, truth = back == 2, labels == 2
    return dice(back > 0, labels > 0), 2 * int((tumor & truth).sum()), int(tumor.sum() + truth.sum())


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
        scores = np.array(rows[tuple(spacing)], float)
        voxels = int(np.prod(grid_shape(clinical, (2.5, 0.7, 0.7), spacing)))
        tumor = scores[:, 1].sum() / max(scores[:, 2].sum(), 1.0)
        print(f"{' × '.join(f'{v:g}' for v in spacing):>27} | {scores[:, 0].min():.3f} (worst) | "
              f"{tumor:.3f}{'':>21} | {voxels / 1e6:5.2f} M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
