"""Reproduction of the AH-Net paper's liver and liver tumor segmentation (sec. 4.2, Table 5) on phantoms.

What runs, with the one trainer and the configs in ``Resources/configs/``:

1. the MC-GCN on 3-slice CT stacks (``ct-liver-tumor-mcgcn.json``);
2. the AH-Net whose encoder is that MC-GCN's, made 3D (``ct-liver-tumor-ahnet.json``): decoder
   only with the encoder locked, then jointly;
3. the 2D U-Net on 3-slice stacks (``ct-liver-tumor-unet2d.json``), the slice-wise baseline.

Both AH-Net steps follow the paper: HU window [-125, 225]; random in-plane rotation (±20°),
scaling (±0.2) and in-plane mirroring; cross-entropy until the loss stops decreasing, then the
focal loss. The shipped 3D U-Net (``Resources/models/ct-liver-tumor-unet3d``, trained with its
config for 1000 steps) is scored as well, without retraining.

Data: synthetic CT phantoms (``phantoms.ct_phantom``, 40 × 96 × 96 with 3.2-5.2 mm pixels and
1-5 mm slices), training seeds 1000-1007 (the configs' ``data``), held-out seeds 5000-5009
written to ``--out``/heldout. Steps are the configs' (MC-GCN 800 on 8×64×64; AH-Net 200
decoder-only + 500 joint on 32×64×64; 2D U-Net 600), about 15 minutes on two otherwise idle
CPU cores; ``--quick`` trains 4 steps per stage on 4 volumes and tests on 2 (a smoke test).

Evaluation: ``evaluation.evaluate`` (the ``transferseg evaluate`` path: the card's
preprocessing, the sliding-window inferer, argmax), with the LiTS metrics of Table 5: Dice
global (all volumes pooled) and Dice per case, for the lesion (label 2) and the liver
(labels 1 and 2). Outputs in ``--out`` (default runs/ahnet_ct): the training runs,
``table.json``, one CSV per network and ``overview.png`` (one held-out case: reference, MC-GCN,
AH-Net).

    .venv/bin/python bench/ahnet_ct.py --quick
    .venv/bin/python bench/ahnet_ct.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from TransferSegLib.evaluation import evaluate  # noqa: E402
from TransferSegLib.io import load_volume  # noqa: E402
from TransferSegLib.models import load_model  # noqa: E402
from TransferSegLib.phantoms import write_phantoms  # noqa: E402
from TransferSegLib.pipeline import run  # noqa: E402
from TransferSegLib.render import save_gallery_png  # noqa: E402

from chain import train_chain  # noqa: E402

NETWORKS = [  # (table name, config file), in training order: the AH-Net needs the MC-GCN's model
    ("MC-GCN", "ct-liver-tumor-mcgcn.json"),
    ("AH-Net", "ct-liver-tumor-ahnet.json"),
    ("2D U-Net", "ct-liver-tumor-unet2d.json"),
]
SHIPPED_3D_UNET = ROOT / "Resources" / "models" / "ct-liver-tumor-unet3d.json"
TEST_SEED = 5000
PAPER_TABLE_5 = {  # AH-Net paper, Table 5 (LiTS test set): lesion DG, DPC, liver DG, DPC
    "GCN": [0.788, 0.593, 0.963, 0.951],
    "3D AH-Net": [0.834, 0.634, 0.970, 0.963],
}


def table_row(table: dict) -> list:
    summary = {row["region"]: row for row in table["summary"]}
    return [summary["liver tumor"]["dice_global"], summary["liver tumor"]["dice_per_case"],
            summary["liver"]["dice_global"], summary["liver"]["dice_per_case"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="AH-Net paper sec. 4.2 / Table 5 on CT phantoms")
    parser.add_argument("--quick", action="store_true", help="a few steps on 4 volumes, 2 test volumes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ahnet_ct", help="run folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--test-count", type=int, default=None, help="held-out phantoms (default 10; --quick 2)")
    args = parser.parse_args(argv)
    if args.quick and args.out == parser.get_default("out"):
        args.out = ROOT / "runs" / "ahnet_ct_quick"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    started = time.perf_counter()

    print(f"training on {args.threads} thread(s) into {args.out}", flush=True)
    trained = {name: card for name, (card, _, _) in train_chain(NETWORKS, args.out, args.threads, args.quick).items()}
    trained["3D U-Net (shipped)"] = SHIPPED_3D_UNET

    count = args.test_count or (2 if args.quick else 10)
    heldout = args.out / "heldout"
    if len(list(heldout.glob("ct_*_label.nii.gz"))) != count:
        write_phantoms("ct", heldout, seed=TEST_SEED, count=count)
    print(f"testing on {count} held-out phantoms (seeds {TEST_SEED}-{TEST_SEED + count - 1}) in {heldout}", flush=True)

    rows, tables = {}, {}
    for name, card in trained.items():
        start = time.perf_counter()
        slug = name.split(" (")[0].lower().replace(" ", "-")
        tables[name] = evaluate(card, heldout, device="cpu", csv_path=args.out / f"eval-{slug}.csv")
        rows[name] = table_row(tables[name])
        print(f"  {name:<19} evaluated in {time.perf_counter() - start:.0f} s", flush=True)

    payload = {"test": {"phantom": "ct", "count": count, "seed": TEST_SEED}, "quick": args.quick,
               "networks": {name: dict(zip(["lesion_dg", "lesion_dpc", "liver_dg", "liver_dpc"], rows[name]))
                            for name in rows},
               "total_seconds": time.perf_counter() - started}
    (args.out / "table.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    # one held-out case: the reference and the two transfer networks' labels
    volume = load_volume(heldout / "ct_000.nii.gz")
    reference = load_volume(heldout / "ct_000_label.nii.gz").array.astype("uint8")
    panels = [dict(volume=volume, labels=reference, title="reference")]
    for name in ("MC-GCN", "AH-Net"):
        labels = run(volume, load_model(trained[name]), device="cpu").labels
        panels.append(dict(volume=volume, labels=labels, title=name))
    save_gallery_png(panels, args.out / "overview.png")

    print(f"\nLiTS metrics on {count} held-out CT phantoms"
          f"{' — QUICK: a smoke test, not a result' if args.quick else ''}")
    print(f"{'network':<21}{'lesion DG':>10}{'lesion DPC':>11}{'liver DG':>10}{'liver DPC':>10}")
    for name, values in rows.items():
        print(f"{name:<21}" + "".join(f"{v:>10.3f}" if n != 1 else f"{v:>11.3f}" for n, v in enumerate(values)))
    print("paper Table 5 (LiTS test set, 70 real CT volumes):")
    for name, values in PAPER_TABLE_5.items():
        print(f"{name:<21}" + "".join(f"{v:>10.3f}" if n != 1 else f"{v:>11.3f}" for n, v in enumerate(values)))
    print(f"numbers: {args.out / 'table.json'}; case ct_000: {args.out / 'overview.png'}; "
          f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
