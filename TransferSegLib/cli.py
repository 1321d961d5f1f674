"""The `transferseg` command.

Every subcommand is a thin adapter: it parses arguments, calls the library, and prints.
A :class:`TransferSegError` becomes one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .volume import TransferSegError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _cmd_info(args) -> int:
    from .io import load_volume

    volume = load_volume(args.input)
    summary = volume.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    k, j, i = summary["shape_kji"]
    sk, sj, si = summary["spacing_kji_mm"]
    ek, ej, ei = summary["extent_kji_mm"]
    print(f"file:         {args.input}")
    print(f"shape:        {i} × {j} × {k} voxels (i × j × k; array axes (k, j, i) = {k}, {j}, {i})")
    print(f"spacing:      {si:g} × {sj:g} × {sk:g} mm (i × j × k)")
    print(f"extent:       {ei:g} × {ej:g} × {ek:g} mm")
    print(f"orientation:  {summary['orientation']}")
    print("origin:       RAS ({:g}, {:g}, {:g}) mm".format(*summary["origin_ras_mm"]))
    print(f"intensity:    {summary['intensity_min']:g} … {summary['intensity_max']:g} "
          f"(mean {summary['intensity_mean']:.4g})")
    print(f"memory:       {summary['memory_mib']:.1f} MiB as float32")
    return 0


def _cmd_phantom(args) -> int:
    from .phantoms import write_phantoms

    paths = write_phantoms(args.kind, args.output, seed=args.seed, count=args.count)
    for path in paths:
        print(path)
    return 0


def _cmd_demo(args) -> int:
    """The main job on an embedded default: a CT phantom written, read back, summarised and drawn."""
    from .io import load_volume, save_labelmap, save_volume
    from .phantoms import ct_phantom
    from .render import save_overview_png

    out = Path(args.output)
    volume, labels = ct_phantom(seed=args.seed)
    ct_path = save_volume(volume, out / "ct_phantom.nii.gz")
    label_path = save_labelmap(labels, volume, out / "ct_phantom_label.nii.gz")
    loaded = load_volume(ct_path)
    loaded_labels = load_volume(label_path).array.astype("uint8")
    summary = loaded.summary()
    print(f"wrote {ct_path} and {label_path}")
    for key, value in summary.items():
        print(f"  {key:16s} {value}")
    counts = {name: int((loaded_labels == value).sum()) for value, name in ((1, "liver"), (2, "liver tumor"))}
    voxel_ml = float(loaded.spacing[0] * loaded.spacing[1] * loaded.spacing[2]) / 1000.0
    for name, count in counts.items():
        print(f"  {name:16s} {count * voxel_ml:.1f} mL")
    png = save_overview_png(loaded, out / "overview.png", labels=loaded_labels, title=f"CT phantom, seed {args.seed}")
    print(f"wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferseg",
        description="2D-to-3D transfer segmentation (AH-Net, ACS, H-DenseUNet, VFN) for CT and DBT volumes.",
    )
    parser.add_argument("--version", action="version", version=f"transferseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="print a volume's shape, spacing, orientation, intensity range and size")
    p.add_argument("input", help="NIfTI / NRRD / MetaImage file or DICOM series folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("phantom", help="write seed-deterministic synthetic volumes and a PNG gallery")
    p.add_argument("kind", choices=["ct", "dbt", "shapes"], help="CT abdomen, DBT breast, or ACS shapes")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--count", type=int, default=1, help="number of cases (default 1)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("demo", help="run the main job on a built-in CT phantom")
    p.add_argument("-o", "--output", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except TransferSegError as e:
        print(f"transferseg: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("transferseg: interrupted; no partial output was kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
