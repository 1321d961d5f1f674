"""Peak memory and time: TransferSeg's sliding-window inferer vs the naive full-float32 way (MONAI).

The job: a synthetic 300×512×512 float32 "CT" (a bright ellipsoid and a small blob in noise),
a tiny 3D network (two 3×3×3 convolutions, 8 hidden channels, K = 3 classes), Gaussian
blending, overlap 0.5, patch 64×128×128, 2 windows per batch, on the CPU, giving uint8
labels and uint8 probabilities.

* ours:  ``TransferSegLib.inference.sliding_window_inference`` (float32 sums over a rolling
  slab of k-rows, uint8 outputs).
* monai: what a user would otherwise write: ``monai.inferers.sliding_window_inference`` (a full
  K-channel float32 output plus a full float32 count map), then argmax and ×255 → uint8.

Each side runs in its own subprocess, so each ``ru_maxrss`` (peak resident set size) is that
side's own; the input volume (300 MiB) is part of both peaks, and "before" is the peak just
before inference starts.  The two label maps are compared at the end (the window layouts
differ a little: MONAI steps by int(patch × 0.5) and clamps the last window, we spread the
windows evenly, so a few voxels on class borders may differ).

Run (from the repository root):

    .venv/bin/python bench/inference_memory.py                        # both sides, side by side
    .venv/bin/python bench/inference_memory.py --size 150 512 512     # a smaller volume
    /usr/bin/time -v .venv/bin/python bench/inference_memory.py --only ours    # one side in this process;
    /usr/bin/time -v .venv/bin/python bench/inference_memory.py --only monai   # see "Maximum resident set size"

With ``--only`` the process ends with ``os._exit`` right after printing, because a normal
interpreter shutdown with torch loaded pages in another 0.1–0.4 GiB that ``/usr/bin/time -v``
would count; so its "Maximum resident set size" matches the peak the script prints.
(``/usr/bin/time -v`` on the default run reports the largest child, not the sum.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from measure import json_from_child, print_and_exit


def peak_rss_mib() -> float:
    """``ru_maxrss``, what ``/usr/bin/time -v`` reports.  It also counts the parent's RSS at fork,
    which this child's own outgrows (torch and the volume) before anything is measured."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def synthetic_ct(shape, seed=0) -> np.ndarray:
    """Noise plus an ellipsoid and a small bright blob, built slice by slice (no full-size temporaries)."""
    rng = np.random.default_rng(seed)
    volume = np.empty(shape, dtype=np.float32)
    nk, nj, ni = shape
    jj, ii = np.meshgrid(np.linspace(-1, 1, nj, dtype=np.float32), np.linspace(-1, 1, ni, dtype=np.float32),
                         indexing="ij")
    for k in range(nk):
        z = np.float32(2.0 * k / max(nk - 1, 1) - 1.0)
        organ = (jj / 0.6) ** 2 + (ii / 0.7) ** 2 + (z / 0.8) ** 2 < 1.0
        lesion = (jj - 0.2) ** 2 + (ii + 0.1) ** 2 + z ** 2 < 0.02
        volume[k] = rng.standard_normal((nj, ni), dtype=np.float32) * 0.3 + organ * 1.0 + lesion * 1.5
    return volume


def tiny_network(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    network = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 3, 3, padding=1))
    return network.eval()


def run_ours(array, network, patch, batch, probabilities):
    # each side imports its own inferer here, after "before": both peaks count that import alike
    from TransferSegLib.inference import sliding_window_inference

    result = sliding_window_inference(array, network, patch_size=patch, overlap=0.5, blend="gaussian",
                                      batch_size=batch, device="cpu", return_probabilities=probabilities)
    return result.labels, result.probabilities


def run_monai(array, network, patch, batch, probabilities):
    # MONAI: a bench-only comparison, no TransferSeg dependency; imported after "before", as ours is
    from monai.inferers import sliding_window_inference as monai_sliding_window_inference

    with torch.inference_mode():
        out = monai_sliding_window_inference(torch.from_numpy(array)[None, None], roi_size=patch,
                                             sw_batch_size=batch, predictor=lambda x: network(x).softmax(1),
                                             overlap=0.5, mode="gaussian", sigma_scale=0.125)[0]
        labels = out.argmax(0).to(torch.uint8).numpy()
        encoded = out.mul_(255.0).round_().to(torch.uint8).numpy() if probabilities else None
    return labels, encoded


def child(args) -> dict:
    array = synthetic_ct(tuple(args.size))
    network = tiny_network()
    before = peak_rss_mib()
    tic = time.perf_counter()
    labels, encoded = (run_ours if args.only == "ours" else run_monai)(
        array, network, tuple(args.patch), args.batch, not args.no_probabilities)
    seconds = time.perf_counter() - tic
    report = {"side": args.only, "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "before_mib": before,
              "labels_histogram": np.bincount(labels.ravel(), minlength=3).tolist()}
    if args.labels_out:
        np.save(args.labels_out, labels)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(300, 512, 512), metavar=("K", "J", "I"))
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 128, 128), metavar=("K", "J", "I"))
    parser.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    parser.add_argument("--no-probabilities", action="store_true", help="labels only")
    parser.add_argument("--only", choices=("ours", "monai"), help="run one side in this process")
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.only:
        report = child(args)
        print_and_exit(json.dumps(report) if args.json else
                       f"{report['side']}: {report['seconds']:.1f} s, peak RSS {report['peak_rss_mib']:.0f} MiB "
                       f"(before inference {report['before_mib']:.0f} MiB)")

    print(f"volume {'×'.join(map(str, args.size))} float32, patch {'×'.join(map(str, args.patch))}, "
          f"batch {args.batch}, overlap 0.5, gaussian, K=3, probabilities={'no' if args.no_probabilities else 'uint8'}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ours", "monai"):
            command = [sys.executable, __file__, "--only", side, "--json", "--labels-out", f"{tmp}/{side}.npy",
                       "--size", *map(str, args.size), "--patch", *map(str, args.patch), "--batch", str(args.batch)]
            if args.no_probabilities:
                command.append("--no-probabilities")
            try:
                reports[side] = json_from_child(command, f"the {side} side")
            except RuntimeError as error:
                print(error, file=sys.stderr)
                return 1
        agreement = float(np.mean(np.load(f"{tmp}/ours.npy") == np.load(f"{tmp}/monai.npy")))
    ours, monai = reports["ours"], reports["monai"]
    print(f"{'':8}{'seconds':>10}{'peak RSS MiB':>15}{'before MiB':>12}   labels histogram (0, 1, 2)")
    for name, r in (("ours", ours), ("monai", monai)):
        print(f"{name:8}{r['seconds']:10.1f}{r['peak_rss_mib']:15.0f}{r['before_mib']:12.0f}   {r['labels_histogram']}")
    print(f"peak RSS ratio monai / ours: {monai['peak_rss_mib'] / ours['peak_rss_mib']:.2f}; "
          f"inference's own memory (peak − before) ratio: "
          f"{(monai['peak_rss_mib'] - monai['before_mib']) / max(ours['peak_rss_mib'] - ours['before_mib'], 1):.2f}; "
          f"time ratio monai / ours: {monai['seconds'] / ours['seconds']:.2f}")
    print(f"labels agree on {agreement * 100:.3f}% of voxels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
