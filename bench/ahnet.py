"""AH-Net inference time and memory: ours vs MONAI's AHNet, and AH-Net vs slice-wise MC-GCN.

Three measurements, each network in eval mode under ``torch.inference_mode``, batch 1:

(a) ``TransferSegLib.nets.AHNet`` vs ``monai.networks.nets.AHNet`` (bench-only dependency), both
    ResNet50, 1 input channel, 1 output map (the DBT heatmap network), 4 pyramid poolings, MONAI
    with ``upsample_mode="trilinear"`` (the paper's upsampling; ours has no other mode). The same
    volume in each network's own axis order: MONAI's AHNet takes (N, C, x, y, z) with z, the
    between-slice axis, last; ours takes (N, C, z, y, x) (DESIGN.md: D = k first). Sizes, paper
    notation x × y × z: 128×128×32 (torch: ours (1, 1, 32, 128, 128), MONAI (1, 1, 128, 128, 32))
    and the paper's DBT volume 384×256×64 (ours (1, 1, 64, 256, 384), MONAI (1, 1, 384, 256, 64)).
    The two networks run alternately, ``--repeats`` times each after one warm-up; the median counts.
(b) AH-Net vs the MC-GCN it is transferred from (ResNet50 both, paper GCN kernels 63 … 5, one
    output map) on the 384×256×64 volume: the MC-GCN runs once per slice on the 3-slice stack
    (s[d-1], s[d], s[d+1]), ``--slice-batch`` stacks per call. As in the paper's Table 3 the
    slicing is not timed (stacks are built beforehand). With ``--mcgcn-slices N`` < 64 only N
    slices are timed and the time is extrapolated to 64 (printed as such).
(c) Peak memory of one forward pass: on the CPU the peak resident set size during the forward
    (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before) less the resident set
    just before, each network in a fresh subprocess (so one network's peak does not hide
    another's; ``ru_maxrss`` would not do: after exec it still holds the parent's peak); on CUDA
    ``torch.cuda.max_memory_allocated`` above the memory held before the forward.

Run from the repository root::

    .venv/bin/python bench/ahnet.py                       # CPU, 1 thread, the whole table
    .venv/bin/python bench/ahnet.py --threads 2 --repeats 5
    .venv/bin/python bench/ahnet.py --device cuda         # bf16 autocast, CUDA events, 20 repeats

The paper (Table 3) measured 17.7 ms for AH-Net and 775.2 ms for MC-GCN on a GTX 1080 Ti (43×).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from TransferSegLib.nets import AHNet, MCGCN

from measure import json_from_child, print_and_exit, proc_status_mib, reset_peak_rss

SIZES = {"128x128x32": (128, 128, 32), "384x256x64": (384, 256, 64)}  # paper notation x × y × z


def ours_input(xyz) -> torch.Tensor:
    x, y, z = xyz
    return torch.randn(1, 1, z, y, x, generator=torch.Generator().manual_seed(0))


def monai_input(ours: torch.Tensor) -> torch.Tensor:
    return ours.permute(0, 1, 4, 3, 2).contiguous()  # (z, y, x) -> (x, y, z): the same voxels


def build(name: str):
    torch.manual_seed(0)
    if name == "ours":
        return AHNet(in_channels=1, out_channels=1, backbone="resnet50").eval()
    if name == "monai":
        # MONAI: a bench-only comparison, no TransferSeg dependency
        from monai.networks.nets import AHNet as MonaiAHNet

        return MonaiAHNet(in_channels=1, out_channels=1, layers=(3, 4, 6, 3), psp_block_num=4,
                          upsample_mode="trilinear").eval()
    if name == "mcgcn":
        return MCGCN(in_channels=3, out_channels=1, backbone="resnet50").eval()
    raise ValueError(name)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slice_stacks(volume: torch.Tensor, slices) -> torch.Tensor:
    """(len(slices), 3, H, W): slice d with its neighbours, clamped at the ends (as SliceStack2D)."""
    depth = volume.shape[2]
    index = torch.tensor([[max(d - 1, 0), d, min(d + 1, depth - 1)] for d in slices])
    return volume[0, 0][index]


def mcgcn_forward(net, stacks: torch.Tensor, slice_batch: int) -> None:
    for start in range(0, stacks.shape[0], slice_batch):
        net(stacks[start:start + slice_batch])


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# --- (c) memory: one network, one forward, in a child process ---------------------------------------
def memory_child(name: str, size: str, device_name: str, slice_batch: int, slices: int) -> None:
    device = torch.device(device_name)
    net = build(name).to(device)
    volume = ours_input(SIZES[size])
    if name == "monai":
        x = monai_input(volume).to(device)
        run = lambda: net(x)  # noqa: E731
    elif name == "ours":
        x = volume.to(device)
        run = lambda: net(x)  # noqa: E731
    else:
        stacks = slice_stacks(volume, range(slices)).to(device)
        run = lambda: mcgcn_forward(net, stacks, slice_batch)  # noqa: E731
    with torch.inference_mode(), autocast(device):
        if device.type == "cuda":
            run()  # warm-up: cuDNN workspaces, autotuning
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            seconds = timed(run, device)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            reset_peak_rss()
            before = proc_status_mib("VmRSS")
            seconds = timed(run, device)
            peak = proc_status_mib("VmHWM") - before
    print_and_exit(json.dumps({"peak_mib": peak, "seconds": seconds}))


def measure_memory(name, size, args) -> dict:
    command = [sys.executable, __file__, "--memory-child", name, size, "--device", args.device,
               "--threads", str(args.threads), "--slice-batch", str(args.slice_batch),
               "--mcgcn-slices", str(args.mcgcn_slices)]
    return json_from_child(command, f"the memory of {name} on {size}", threads=args.threads)


# --- the run ----------------------------------------------------------------------------------------
def median_pair(first, second, repeats, device):
    """Alternate two callables (one warm-up each), return the median seconds of each."""
    a_times, b_times = [], []
    timed(first, device)
    timed(second, device)
    for _ in range(repeats):
        a_times.append(timed(first, device))
        b_times.append(timed(second, device))
    return statistics.median(a_times), statistics.median(b_times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: other jobs share the machine)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per network (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--slice-batch", type=int, default=8, help="MC-GCN stacks per forward call")
    parser.add_argument("--mcgcn-slices", type=int, default=64, help="slices of the 64 timed for MC-GCN (extrapolated)")
    parser.add_argument("--no-memory", action="store_true", help="skip (c), the memory subprocesses")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--memory-child", nargs=2, metavar=("NETWORK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_child:
        memory_child(*args.memory_child, args.device, args.slice_batch, args.mcgcn_slices)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    slices = min(args.mcgcn_slices, SIZES["384x256x64"][2])
    print(f"device {device}{' (bf16 autocast)' if device.type == 'cuda' else f', {args.threads} thread(s)'}; "
          f"median of {repeats} runs after one warm-up; torch {torch.__version__}", flush=True)

    rows, results = [], {"device": str(device), "threads": args.threads, "repeats": repeats}
    ours, monai = build("ours").to(device), build("monai").to(device)
    with torch.inference_mode(), autocast(device):
        for size, xyz in SIZES.items():
            x_ours = ours_input(xyz).to(device)
            x_monai = monai_input(x_ours)
            t_ours, t_monai = median_pair(lambda: ours(x_ours), lambda: monai(x_monai), repeats, device)
            results[f"a_{size}"] = {"ours_s": t_ours, "monai_s": t_monai, "ratio": t_ours / t_monai}
            rows.append((f"(a) {size}", "AH-Net ours", t_ours, "MONAI AHNet", t_monai, t_ours / t_monai))
            print(f"  (a) {size}: ours {t_ours:.3f} s, MONAI {t_monai:.3f} s", flush=True)
        del monai

        volume = ours_input(SIZES["384x256x64"]).to(device)
        mcgcn = build("mcgcn").to(device)
        stacks = slice_stacks(volume, range(slices))
        t_mcgcn_part, t_ahnet = median_pair(lambda: mcgcn_forward(mcgcn, stacks, args.slice_batch),
                                            lambda: ours(volume), max(1, repeats - 1), device)
    t_mcgcn = t_mcgcn_part * SIZES["384x256x64"][2] / slices
    label = "MC-GCN slice-wise" + (f" ({slices} slices ×{64 / slices:g})" if slices < 64 else "")
    results["b_384x256x64"] = {"ahnet_s": t_ahnet, "mcgcn_s": t_mcgcn, "mcgcn_slices_timed": slices,
                               "speedup": t_mcgcn / t_ahnet}
    rows.append(("(b) 384x256x64", "AH-Net ours", t_ahnet, label, t_mcgcn, t_ahnet / t_mcgcn))

    memory = {}
    if not args.no_memory:
        for name, size in (("ours", "128x128x32"), ("monai", "128x128x32"), ("ours", "384x256x64"),
                           ("monai", "384x256x64"), ("mcgcn", "384x256x64")):
            memory[f"{name} {size}"] = measure_memory(name, size, args)["peak_mib"]
            print(f"  (c) {name} {size}: {memory[f'{name} {size}']:.0f} MiB", flush=True)
        results["c_peak_mib"] = memory

    print()
    print(f"{'measurement':<17} {'network A':<14} {'A':>10} {'network B':<30} {'B':>10} {'A / B':>7}")
    for what, name_a, a, name_b, b, ratio in rows:
        print(f"{what:<17} {name_a:<14} {a * 1000:>8.0f}ms {name_b:<30} {b * 1000:>8.0f}ms {ratio:>7.3f}")
    print(f"(b) AH-Net is {t_mcgcn / t_ahnet:.1f}× faster than slice-wise MC-GCN here (paper, GTX 1080 Ti: 43×)")
    if memory:
        kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS growth during the forward"
        print(f"(c) {kind}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items())
              + f" (MC-GCN: {min(slices, args.slice_batch)} stacks per call)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
