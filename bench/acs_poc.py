"""ACS paper, Table IV proof of concept: does 2D pretraining help the converted 3D model?

1. Pretrain a 2D U-Net on the 2D shapes set (circle, square, triangle).
2. Convert it to 2.5D, 3D (I3D inflation) and ACS, each randomly initialised (r.) and
   pretrained (p.); the 6-class head (background + 5 solids) is new in every model.
3. Before any 3D training, measure how well the converted features separate each solid from
   the background (feature mAUC).
4. Train each on the small 3D set (sphere, cube, cylinder, cone, pyramid) with the same
   seeded batches, then report Dice and mIoU averaged over the 5 foreground classes.

The paper's ordering: ACS p. > 3D r. ≈ ACS r. > 2.5D.

Sizes are reduced to fit under 30 minutes on 2 CPU cores (printed at the start).  The models
here are converted in-memory networks, which have no architecture name for the shared trainer's
configs, so this script trains them with its own short loop (the same for every model).

mAUC (the paper's supplement is not available to us, so our definition): for each foreground
class c, the best single-channel ROC AUC, max over channels of max(AUC, 1 − AUC), for separating
class-c voxels from background voxels, using the features that feed the final 1×1×1 conv;
averaged over the 5 classes.

    python bench/acs_poc.py                      # the reduced-size run (≈ 15–20 min on 2 cores)
    python bench/acs_poc.py --quick              # a 1–2 minute smoke run
    python bench/acs_poc.py --out runs/acs_poc   # also writes results.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from TransferSegLib.nets import UNet2D
from TransferSegLib.nets.convert import convert
from TransferSegLib.phantoms import SHAPES_3D, shapes_2d, shapes_3d

MODES = ("2.5d", "3d", "acs")


def unet2d(out_channels: int, base: int) -> UNet2D:
    return UNet2D(in_channels=1, out_channels=out_channels, base_channels=base, levels=3)


def fit(model, inputs, labels, steps, batch, seed, lr=2e-3, log=None):
    """Adam on cross-entropy over random batches (drawn from ``seed``: the same for every model);
    returns the losses; ``log`` gets five progress lines."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_all, y_all = torch.from_numpy(inputs[:, None]), torch.from_numpy(labels.astype(np.int64))
    model.train()
    losses = []
    for step in range(steps):
        index = rng.choice(len(inputs), size=batch, replace=False)
        loss = F.cross_entropy(model(x_all[index]), y_all[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  2D pretraining step {step + 1}/{steps}: loss {loss.item():.3f}")
    return losses


def pretrain_2d(images, labels, base, steps, batch, seed, log):
    torch.manual_seed(seed)
    net = unet2d(1 + 3, base)
    fit(net, images, labels, steps, batch, seed, log=log)
    return net


def build_3d(mode: str, pretrained: UNet2D | None, base: int, seed: int) -> torch.nn.Module:
    """A 6-class 2D U-Net (pretrained body copied in for p.), converted to ``mode``."""
    torch.manual_seed(seed)
    net = unet2d(1 + len(SHAPES_3D), base)
    if pretrained is not None:
        own = net.state_dict()
        body = {k: v for k, v in pretrained.state_dict().items() if own[k].shape == v.shape}  # all but the head
        own.update(body)
        net.load_state_dict(own)
    return convert(net, to=mode)


def final_features(model, volumes):
    """Inputs of the last 1×1×1 conv (the features the head sees), (N, C, D, H, W)."""
    last = [m for m in model.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 5][-1]
    captured = []
    handle = last.register_forward_hook(lambda mod, inputs, output: captured.append(inputs[0].detach()))
    with torch.no_grad():
        model.eval()
        model(torch.from_numpy(volumes[:, None]))
    handle.remove()
    return captured[0]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the Mann–Whitney rank formula."""
    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def feature_mauc(model, volumes, labels, rng, samples=4000) -> float:
    feats = final_features(model, volumes)
    channels = feats.shape[1]
    flat = feats.permute(1, 0, 2, 3, 4).reshape(channels, -1).numpy()
    flat_labels = labels.reshape(-1)
    background = np.flatnonzero(flat_labels == 0)
    scores = []
    for c in range(1, len(SHAPES_3D) + 1):
        fg = np.flatnonzero(flat_labels == c)
        if len(fg) == 0:
            continue
        pick = np.concatenate([rng.choice(fg, min(samples, len(fg)), replace=False),
                               rng.choice(background, min(samples, len(background)), replace=False)])
        positive = flat_labels[pick] == c
        best = max(max(a, 1 - a) for a in (auc(flat[ch, pick], positive) for ch in range(channels)))
        scores.append(best)
    return float(np.mean(scores))


def train_3d(model, volumes, labels, steps, batch, seed, lr=2e-3):
    torch.manual_seed(seed)
    return fit(model, volumes, labels, steps, batch, seed, lr=lr)


def dice_miou(model, volumes, labels):
    """Dice and IoU per foreground class over the whole test set (pooled), then averaged."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(volumes[n:n + 2, None])).argmax(1) for n in range(0, len(volumes), 2)])
    pred, ref = pred.numpy(), labels
    dices, ious = [], []
    for c in range(1, len(SHAPES_3D) + 1):
        p, r = pred == c, ref == c
        inter, total, union = (p & r).sum(), p.sum() + r.sum(), (p | r).sum()
        dices.append(2 * inter / total if total else 1.0)
        ious.append(inter / union if union else 1.0)
    return float(np.mean(dices)), float(np.mean(ious))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        size2d, n2d, steps2d, size3d, n3d_train, n3d_test, steps3d, base = 32, 96, 40, 24, 8, 4, 10, 4
    else:
        size2d, n2d, steps2d, size3d, n3d_train, n3d_test, steps3d, base = 32, 1200, 400, 32, 32, 16, 1000, 8
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f"sizes: 2D set {n2d} images of {size2d}²; 3D set {n3d_train} train + {n3d_test} test volumes of "
        f"{size3d}³; U-Net base {base}, 3 levels; 2D pretraining {steps2d} steps × 16; 3D training "
        f"{steps3d} steps × 2 per model; seed {args.seed}; {args.threads} threads")
    start = time.perf_counter()
    images, labels2d = shapes_2d(args.seed, n2d, size=size2d)
    volumes, labels3d = shapes_3d(args.seed + 1, n3d_train + n3d_test, size=size3d)
    train_v, train_l = volumes[:n3d_train], labels3d[:n3d_train]
    test_v, test_l = volumes[n3d_train:], labels3d[n3d_train:]
    log(f"data generated in {time.perf_counter() - start:.0f} s")

    t = time.perf_counter()
    pretrained = pretrain_2d(images, labels2d, base, steps2d, 16, args.seed, log)
    log(f"2D pretraining: {time.perf_counter() - t:.0f} s")

    rng = np.random.default_rng(args.seed)
    rows = []
    for mode in MODES:
        for init in ("r.", "p."):
            t = time.perf_counter()
            model = build_3d(mode, pretrained if init == "p." else None, base, args.seed + 7)
            parameters = sum(p.numel() for p in model.parameters())
            mauc = feature_mauc(model, test_v, test_l, rng)
            losses = train_3d(model, train_v, train_l, steps3d, 2, args.seed + 11)
            dice, miou = dice_miou(model, test_v, test_l)
            row = {"model": f"{mode.upper() if mode != '2.5d' else '2.5D'} {init}", "mode": mode, "init": init,
                   "parameters": parameters, "feature_mAUC": mauc, "dice": dice, "miou": miou,
                   "final_loss": float(np.mean(losses[-10:])), "seconds": time.perf_counter() - t}
            rows.append(row)
            log(f"  {row['model']:8s} params {parameters:,}  mAUC {mauc:.3f}  Dice {dice:.3f}  mIoU {miou:.3f}  "
                f"({row['seconds']:.0f} s)")

    log("\n| model | parameters | feature mAUC (before 3D training) | Dice | mIoU |")
    log("|---|---|---|---|---|")
    for row in rows:
        log(f"| {row['model']} | {row['parameters']:,} | {row['feature_mAUC']:.3f} | {row['dice']:.3f} | "
            f"{row['miou']:.3f} |")
    log(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "quick": args.quick, "seed": args.seed}, indent=2),
                                          encoding="utf-8")


if __name__ == "__main__":
    main()
