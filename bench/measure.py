"""Measuring a process: its memory from /proc, and a child process that reports one JSON line.

Memory comes from the process's own ``/proc/self/status`` (Linux): ``VmRSS`` is what it holds
now, ``VmHWM`` its peak, which ``reset_peak_rss`` brings down to the current RSS.  Not
``getrusage``: its ``ru_maxrss`` carries over the parent's RSS at fork (and keeps it across exec),
so every child would report at least the bench's own.

``measure`` runs one end-to-end job in a fresh process, ``python bench/measure.py SPEC`` (read
the input, ``pipeline.run``, ``Result.write``), and returns its seconds and peak RSS.

This module imports only the standard library at load time: ``inference_memory.py`` uses it in
children whose whole peak RSS is the result, so every module imported here would count there.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = float(1 << 30)


# --- this process's memory ------------------------------------------------------------------
def proc_status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Bring this process's peak RSS (VmHWM) down to its current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
    except OSError:
        pass  # then VmHWM is this process's peak since exec


def peak_rss_gib() -> float:
    """This process's own peak RSS (VmHWM), or ``ru_maxrss`` where there is no /proc."""
    try:
        return proc_status_mib("VmHWM") / 1024.0
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


# --- a child process that reports JSON ------------------------------------------------------
def json_from_child(command: list, what: str, threads: int | None = None, timeout: float | None = None):
    """Run ``command`` and return the JSON on the last line of its stdout; with ``threads``, the
    child's OMP_NUM_THREADS too.  Raises RuntimeError ("``what`` failed" and the end of its stderr)
    if it fails, ``subprocess.TimeoutExpired`` if it runs past ``timeout`` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_and_exit(text: str) -> None:
    """A child's last words: ``text`` on stdout, then ``os._exit``, because an interpreter shutdown
    with torch loaded pages in another 0.1–0.4 GiB that is no part of what was measured."""
    print(text, flush=True)
    os._exit(0)


# --- one end-to-end run in a fresh process --------------------------------------------------
def measure(input_path: Path, model, output: Path, threads: int, timeout: float = None, device: str = "cpu") -> dict:
    """One end-to-end run in a fresh process (:func:`end_to_end`); ``None`` when it ran past ``timeout`` seconds."""
    spec = {"input": str(input_path), "model": str(model), "output": str(output), "threads": threads,
            "device": device}
    command = [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)]
    try:
        return json_from_child(command, f"measurement of {Path(input_path).name}", threads, timeout)
    except subprocess.TimeoutExpired:
        return None


def end_to_end(spec: dict) -> dict:
    """Runs in the child: read the input → pipeline.run (the model load inside, its time in
    ``timings_s["load_model"]``) → Result.write, each timed, with the peak RSS (and, on a GPU, the
    peak memory torch allocated there)."""
    # only the measuring child imports torch and the pipeline (see the module docstring)
    import torch
    from TransferSegLib.io import load_volume
    from TransferSegLib.pipeline import run

    torch.set_num_threads(int(spec["threads"]))
    device = spec.get("device", "cpu")
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context is made before the clock starts
    start = time.perf_counter()
    volume = load_volume(spec["input"])
    loaded = time.perf_counter() - start
    result = run(volume, spec["model"], device=device)
    ran = time.perf_counter()
    result.write(spec["output"], input_path=spec["input"])
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "load_input_s": loaded, "run_s": ran - start - loaded,
           "write_s": seconds - (ran - start), "timings_s": result.timings, "device": str(result.device),
           "peak_rss_gib": peak_rss_gib(),
           "warnings": result.warnings, "shape": list(volume.shape)}
    if device.startswith("cuda"):
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(torch.device(device)) / GIB
    if result.task == "heatmap":
        out["detections"] = [d.to_dict() for d in result.detections]
    return out


if __name__ == "__main__":
    print(json.dumps(end_to_end(json.loads(sys.argv[1]))))
