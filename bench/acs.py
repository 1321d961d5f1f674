"""Time TransferSeg's ACSConv against nn.Conv3d 3×3×3 and the ``acsconv`` package's ACSConv.

Same input tensor, same channels in and out (Ci = Co = C), kernel 3, padding 1, bias, for the
shapes (N, C, D, H, W) = 1×64×32×64×64 and 1×32×64×128×128 by default. For each operator:

* forward: one call under ``torch.no_grad()`` (inference);
* forward+backward: a call with the input requiring grad, then ``y.backward(g)`` with a fixed
  random ``g`` laid out like ``y`` (weight, bias and input gradients, as in a training step).

Timings are ``torch.utils.benchmark.Timer.blocked_autorange`` medians; the operators are timed
in turn, ``--rounds`` times over, and two tables are printed: the best round of each operator
(closest to its cost on an idle machine) and the median round (a load that comes and goes on a
shared machine hits all operators alike). Ratios: ours/Conv3d, ours/acsconv and acsconv/Conv3d.
``--layouts contiguous channels_last`` also times every operator on a channels_last_3d input
(what a network of ACS layers passes on: ACSConv returns that layout).
Peak memory: on CUDA ``max_memory_allocated`` above the inputs; on the CPU (Linux) the rise of
the peak resident set size over one call, each operator in a fresh child process, the peak reset
through /proc/self/clear_refs just before the call (``--no-memory`` skips).

acsconv (0.1.1, PyPI) is not a TransferSeg dependency; install it outside the project's
environment and point the bench at it (``--no-deps``: it needs nothing but torch to run):

    .venv/bin/pip install --no-deps --target /tmp/acsconv_site acsconv
    .venv/bin/python bench/acs.py --acsconv-path /tmp/acsconv_site
    .venv/bin/python bench/acs.py --device cuda --bf16          # on a GPU machine

Without it, the bench times a re-implementation of acsconv's forward for these arguments (three
conv3d calls with weight.unsqueeze(2/3/4), concatenated, bias added after) and says so.

What bounds ACSConv here (2-core AMD EPYC, AVX-512, torch 2.14.1, oneDNN 3.12): each view is a
oneDNN brgconv on channels-last data that vectorises over output channels in blocks of 16/32,
so a view with 21-22 (or 10-11) output channels costs as much as one with 32 (or 16): three views
do about 1.5× the FLOPs the paper counts, and ~0.5× Conv3d is the floor before any layout work.
On an NCDHW input the one transposition to channels-last (~25 ms at 1×64×32×64×64) replaces the
three internal reorders acsconv pays; on a channels-last input ACSConv and acsconv run the same
three convolutions. Measured on a shared machine, forward: ours/Conv3d 0.65-0.70 and 0.82-0.87,
ours/acsconv 0.81-0.86 and 0.78-0.82 (the two default shapes, NCDHW input); on channels-last
input ours/acsconv 0.9-1.1. Folded conv2d views, NNPACK Winograd, oneDNN blocked tensors and
MKL per-tap GEMMs were all slower.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from TransferSegLib.nets.acs import ACSConv, acs_channel_split

from measure import json_from_child, print_and_exit, proc_status_mib, reset_peak_rss

SHAPES = ("1x64x32x64x64", "1x32x64x128x128")
OPS = ("conv3d", "acsconv", "ours")


class AcsconvForward(nn.Module):
    """acsconv 0.1.1's ACSConv forward for kernel 3 / padding 1 / stride 1, written from its
    description: conv3d with weight.unsqueeze(2 / 3 / 4) on the (a, c, s) output split, cat, + bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(channels))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        nn.init.uniform_(self.bias, -0.05, 0.05)
        self.split = acs_channel_split(channels)

    def forward(self, x):
        a, c, _ = self.split
        w = self.weight
        y = torch.cat([F.conv3d(x, w[:a].unsqueeze(2), None, 1, (0, 1, 1)),
                       F.conv3d(x, w[a:a + c].unsqueeze(3), None, 1, (1, 0, 1)),
                       F.conv3d(x, w[a + c:].unsqueeze(4), None, 1, (1, 1, 0))], dim=1)
        return y + self.bias.view(1, -1, 1, 1, 1)


def acsconv_class(folder: str | None):
    """acsconv's ACSConv, from ``folder`` (``--acsconv-path``: where ``pip install --target`` put the
    package) when given, else from the environment; None when there is no acsconv."""
    try:
        if folder:
            package = Path(folder) / "acsconv"
            spec = importlib.util.spec_from_file_location("acsconv", package / "__init__.py",
                                                          submodule_search_locations=[str(package)])
            sys.modules["acsconv"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules["acsconv"])
        # acsconv is optional, no TransferSeg dependency: without it the bench times a re-implementation
        from acsconv.operators import ACSConv as PackageACSConv
    except (ImportError, OSError):
        sys.modules.pop("acsconv", None)
        return None
    return PackageACSConv


def build_ops(channels: int, device, dtype, acsconv_path):
    """The three operators with the same 2D weights (Conv3d has its own 3×3×3 ones)."""
    torch.manual_seed(0)
    ours = ACSConv(channels, channels, 3, padding=1)
    package = acsconv_class(acsconv_path)
    if package is not None:
        theirs = package(channels, channels, 3, padding=1)
        label = f"acsconv {sys.modules['acsconv'].__version__} (package)"
    else:
        theirs = AcsconvForward(channels)
        label = "acsconv NOT INSTALLED: re-implementation of its forward (3× conv3d, weight.unsqueeze(2/3/4))"
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    ops = {"conv3d": nn.Conv3d(channels, channels, 3, padding=1), "acsconv": theirs, "ours": ours}
    return {k: v.to(device=device, dtype=dtype) for k, v in ops.items()}, label


def make_input(shape, device, dtype, layout):
    x = torch.randn(*shape, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else x


def timers(op, x, amp):
    """Forward (no grad) and forward+backward statements for one operator."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.no_grad(), autocast:
        g = torch.randn_like(op(x))
    xg = x.detach().clone().requires_grad_(True)
    params = list(op.parameters())

    def forward():
        with torch.no_grad(), autocast:
            op(x)

    def forward_backward():
        for p in [xg, *params]:
            p.grad = None
        with autocast:
            y = op(xg)
        y.backward(g)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def measure(fn, min_run_time):
    fn()  # warm-up: oneDNN primitive creation, allocator
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def peak_memory_cuda(op, x, mode, amp):
    fns = timers(op, x, amp)
    fns[mode]()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fns[mode]()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def memory_child(args):
    """One operator, one call, in this fresh process: the rise of the peak RSS in MiB."""
    shape = tuple(int(v) for v in args.memory_child[1].split("x"))
    torch.set_num_threads(args.threads)
    ops, _ = build_ops(shape[1], "cpu", torch.float32, args.acsconv_path)
    op, x = ops[args.memory_child[0]], make_input(shape, "cpu", torch.float32, args.memory_child[2])
    before = proc_status_mib("VmRSS")
    reset_peak_rss()
    if args.memory_child[3] == "fwd":
        with torch.no_grad():
            op(x)
    else:  # the output gradient is part of the step (an output-sized tensor for every operator)
        y = op(x.requires_grad_(True))
        y.backward(torch.ones_like(y))
    print_and_exit(json.dumps(proc_status_mib("VmHWM") - before))


def peak_memory_cpu(args, op, shape, layout, mode):
    cmd = [sys.executable, __file__, "--memory-child", op, shape, layout, mode, "--threads", str(args.threads)]
    if args.acsconv_path:
        cmd += ["--acsconv-path", args.acsconv_path]
    return float(json_from_child(cmd, f"the memory of {op} on {shape} ({layout}, {mode})"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="N×C×D×H×W, e.g. 1x64x32x64x64")
    parser.add_argument("--layouts", nargs="+", default=["contiguous"], choices=("contiguous", "channels_last"))
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per blocked_autorange")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--acsconv-path", help="a folder holding the acsconv package (pip install --target)")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.bf16 and device.type == "cuda"
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + (", bf16 autocast" if amp else ", float32")
          + (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""))
    rows = []
    for shape_text in args.shapes:
        shape = tuple(int(v) for v in shape_text.split("x"))
        ops, label = build_ops(shape[1], device, torch.float32, args.acsconv_path)
        for layout in args.layouts:
            x = make_input(shape, device, torch.float32, layout)
            with torch.no_grad():
                difference = (ops["ours"](x) - ops["acsconv"](x)).abs().max().item()
            fns = {name: timers(op, x, amp) for name, op in ops.items()}
            times = {(name, mode): [] for name in OPS for mode in ("fwd", "fwd+bwd")}
            for _ in range(args.rounds):
                for mode in ("fwd", "fwd+bwd"):
                    for name in OPS:
                        times[name, mode].append(measure(fns[name][mode], args.min_run_time))
            for mode in ("fwd", "fwd+bwd"):
                t = {stat: {name: f(times[name, mode]) for name in OPS}
                     for stat, f in (("best round", min), ("median round", statistics.median))}
                memory = {}
                if not args.no_memory:
                    for name in OPS:
                        memory[name] = (peak_memory_cuda(ops[name], x, mode, amp) if device.type == "cuda"
                                        else peak_memory_cpu(args, name, shape_text, layout, mode))
                rows.append((shape_text, layout, mode, t, memory))
            print(f"  {shape_text} {layout}: |ours - acsconv| max {difference:.2e}")
        del ops, x, fns
    print(f"acsconv: {label}")
    for stat in ("best round", "median round"):
        head = (f"{stat + ':':17} {'input':13} {'pass':8} {'Conv3d ms':>10} {'acsconv ms':>11} {'ours ms':>8} "
                f"{'ours/Conv3d':>11} {'ours/acsconv':>12} {'acsconv/Conv3d':>14}")
        if not args.no_memory:
            head += f"  {'peak MiB Conv3d / acsconv / ours':>32}"
        print(head)
        for shape_text, layout, mode, times, memory in rows:
            t = times[stat]
            line = (f"{shape_text:17} {layout:13} {mode:8} {t['conv3d'] * 1e3:10.1f} {t['acsconv'] * 1e3:11.1f} "
                    f"{t['ours'] * 1e3:8.1f} {t['ours'] / t['conv3d']:11.2f} {t['ours'] / t['acsconv']:12.2f} "
                    f"{t['acsconv'] / t['conv3d']:14.2f}")
            if memory:
                line += f"  {memory['conv3d']:10.0f} / {memory['acsconv']:7.0f} / {memory['ours']:5.0f}"
            print(line)


if __name__ == "__main__":
    main()
