"""Many volumes, one model: a folder or a list of inputs, each case to its own output folder.

:func:`find_cases` turns inputs into cases: a volume file is a case; a folder holding volume
files (the suffixes :data:`~TransferSegLib.io.READ_SUFFIXES` names) makes each of them a case,
and each subfolder holding a DICOM series too; a folder holding no volume file but a DICOM
series is one case itself.  :func:`run_batch` loads the model once, runs
:func:`~TransferSegLib.pipeline.run` on every case into ``OUT/<case name>`` and writes
``OUT/summary.csv``, one row per case.  A case whose input cannot be read or run (any
:class:`TransferSegError` or ``OSError``) becomes a ``failed`` row and the others go on;
cancelling stops the whole batch.

Under torchrun, :func:`~TransferSegLib.training.distributed.processes` joins the process group (gloo on
CPU, nccl on CUDA, one GPU per local rank) and each rank runs ``cases[rank::world_size]``; rank 0
gathers every rank's rows and writes the one summary.
"""
from __future__ import annotations

import csv
import os
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import SimpleITK as sitk

from .atomic import atomic_output, check_output_folder, is_utf8, resolved
from .io import READ_SUFFIXES, full_suffix, load_volume, native_stderr_silenced
from .models import LoadedModel, load_model
from .pipeline import check_writable, output_names, run
from .progress import Cancelled, CancelToken, ProgressCallback, StageProgress, check_cancel, one_line
from .volume import TransferSegError

__all__ = ["Case", "SUMMARY_NAME", "case_folder", "find_cases", "run_batch", "summary_columns"]

SUMMARY_NAME = "summary.csv"


@dataclass(frozen=True)
class Case:
    """One volume to run: its output folder is named ``name``; ``path`` is what load_volume reads."""

    name: str
    path: Path


def _volume_suffix(path: Path) -> Optional[str]:
    suffix = full_suffix(path)
    return suffix if suffix in READ_SUFFIXES else None


def _holds_dicom_series(folder: Path) -> bool:
    if not is_utf8(folder):  # SimpleITK's native code aborts on such a name; the case fails on its own
        return False
    with native_stderr_silenced():  # GDCM complains on stderr about every file that is not DICOM
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def case_folder(output: Path, case: Case) -> Path:
    """``output/<case name>``, proven to be a folder directly inside ``output``: a case name derived
    from a hostile file name (``..``, a separator, a newline, bytes that are not UTF-8, our own
    staging prefix) is refused with :class:`TransferSegError` instead of writing anywhere else."""
    name, shown = case.name, one_line(case.name)
    problem = None
    if name in ("", ".", ".."):
        problem = f"'{shown}' is not a folder name"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "it holds a path separator"
    elif shown != name:
        problem = "it holds control characters or bytes that are not UTF-8"
    elif name.startswith(".transferseg"):
        problem = "it starts with '.transferseg', the name of TransferSeg's own staging folders"
    if problem:
        raise TransferSegError(f"{one_line(case.path)}: the case name '{shown}' (from the file name) cannot be an "
                               f"output folder: {problem}; rename the input")
    folder = output / name
    if resolved(folder).parent != resolved(output):
        raise TransferSegError(f"{folder} leads outside the output folder {output} (it is a link to "
                               f"{resolved(folder)}); remove the link")
    return folder


def _case_name(path: Path) -> str:
    if path.is_dir():
        return path.name or path.resolve().name
    suffix = _volume_suffix(path)
    return (path.name[: len(path.name) - len(suffix)] if suffix else path.stem) or path.name


def _folder_cases(folder: Path) -> list:
    """The cases in ``folder``, sorted by name; ``[folder]`` when the folder is itself one (a DICOM series)."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    files = [p for p in entries if p.is_file() and _volume_suffix(p)]
    if not files and _holds_dicom_series(folder):
        return [folder]
    series = [p for p in entries if p.is_dir() and _holds_dicom_series(p)]
    # Nothing to run: the folder itself, so that load_volume says what is wrong with it.
    return sorted(files + series, key=lambda p: p.name) or [folder]


def find_cases(inputs) -> list:
    """The :class:`Case` list for ``inputs`` (paths, or cases found before), in the order given, a
    folder's cases sorted by name.

    A file given by name is a case whatever its type (reading it reports what is wrong).  Raises
    :class:`TransferSegError`, before anything runs, when two cases would share an output folder.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found = []
    for item in inputs:
        if isinstance(item, Case):
            found.append(item)
            continue
        path = Path(item).expanduser()
        found += [Case(_case_name(p), p) for p in (_folder_cases(path) if path.is_dir() else [path])]
    cases, seen = [], {}
    for case in found:
        key = unicodedata.normalize("NFC", case.name).casefold()  # a clash on a case-insensitive or normalising disk
        if key in seen:
            raise TransferSegError(
                f"{seen[key].path} and {case.path} would both be written to the output folder '{case.name}'; "
                "rename one of them or run them separately"
            )
        seen[key] = case
        cases.append(case)
    return cases


def summary_columns(card: dict, distributed: bool = False) -> list:
    """The summary.csv header: the case, its status and timing, then per label its volume in mL
    (segmentation) or the number of detections (heatmap task); ``rank`` under torchrun."""
    columns = ["case", "input", "status", "error", "output", "seconds", "warnings"]
    if card.get("task", "segmentation") == "heatmap":
        columns.append("detections")
    else:
        columns += [f"{seg['name']} mL" for seg in card["labels"]]
    return columns + (["rank"] if distributed else [])


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        text = f"{error.strerror or error}{where}"
    else:
        text = str(error)
    return one_line(" ".join(text.split()) or type(error).__name__)


def _run_case(case: Case, index: int, output: Path, loaded, device, progress, cancel, method_options, rank) -> dict:
    # the summary and the lines printed show a hostile name escaped, never raw
    row = {"case": one_line(case.name), "input": one_line(case.path), "status": "ok", "error": "", "output": "",
           "seconds": 0.0, "warnings": "", "rank": rank, "_index": index}
    start = time.perf_counter()
    try:
        folder = case_folder(output, case)
        volume = load_volume(case.path)
        check_writable(volume)
        result = run(volume, model=loaded, device=device, progress=progress, cancel=cancel,
                     method_options=method_options)
        result.write(folder, input_path=case.path)
    except Cancelled:
        raise
    except (TransferSegError, OSError) as e:
        row.update(status="failed", error=_one_line(e))
    else:
        row["output"] = one_line(folder)
        row["warnings"] = one_line("; ".join(result.warnings + result.fallbacks))
        if result.task == "heatmap":
            row["detections"] = len(result.detections)
        else:
            row.update({f"{name} mL": ml for name, ml in result.volumes_ml().items()})
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _gather(rows: list, world: int) -> list:
    if world <= 1:
        return rows
    import torch.distributed as dist  # torch only under torchrun: finding and checking cases stays torch-free

    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def _write_summary(path: Path, rows: list, columns: list) -> Path:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return path


def run_batch(inputs, output_dir, model, device="auto", progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None, method_options: Optional[dict] = None,
              rank: Optional[int] = None, world_size: Optional[int] = None,
              on_case: Optional[Callable[[dict], None]] = None) -> list:
    """Run ``model`` on every case of ``inputs`` (see :func:`find_cases`); return every case's row.

    Each case is written to ``output_dir/<case name>`` (all its files or none, as
    :meth:`Result.write <TransferSegLib.pipeline.Result.write>`); ``output_dir/summary.csv``
    gets one row per case (columns :func:`summary_columns`), written atomically.

    Args:
        model: a name, a path or a loaded :class:`~TransferSegLib.models.LoadedModel`; loaded once.
        progress: ``callable(fraction, stage)`` over this process's cases; the stage names the case.
        cancel: a :class:`CancelToken`; cancelling stops the batch with
            :class:`~TransferSegLib.progress.Cancelled`.  Finished cases keep their complete
            folders, the case in progress writes nothing, and no summary is written.
        rank, world_size: under torchrun (from :func:`~TransferSegLib.training.distributed.processes`, whose
            process group must be up), this process runs ``cases[rank::world_size]`` and rank 0
            writes the summary of all; every rank returns every row.
        on_case: called with each row of this process as soon as its case is done.

    A case that fails with :class:`TransferSegError` or ``OSError`` (unreadable, 2D, 4D, a full
    disk, …) gets status ``failed`` and its one-line error; the others still run.  Rows are
    dicts with the summary's columns (and ``rank``), in the order of the cases.
    """
    rank, world = int(rank or 0), int(world_size or 1)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0…{world - 1}")
    cases = find_cases(inputs)
    output = check_output_folder(output_dir)
    for case in cases:
        if case.name.casefold() == SUMMARY_NAME:
            raise TransferSegError(f"{case.path}: a case named {case.name} would take the summary's place; rename it")
        if case.path.is_dir() and is_utf8(case.path) and resolved(output / case.name) == resolved(case.path):
            raise TransferSegError(f"the output folder {output / case.name} would be the input series {case.path} "
                                   "itself; choose another output folder")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    names = output_names(loaded.card["task"])
    for case in cases:  # an input where a case's output goes: refused before any case runs
        try:
            folder = case_folder(output, case)
        except TransferSegError:
            continue  # a name that cannot be a folder: that case fails in its turn, the others run
        check_output_folder(folder, names, input_path=case.path)
    output.mkdir(parents=True, exist_ok=True)  # once, before the ranks write beside each other in it

    mine = list(enumerate(cases))[rank::world]
    report = StageProgress(progress)
    rows = []
    try:
        for n, (index, case) in enumerate(mine):
            check_cancel(cancel)
            part = report.sub(n / len(mine), (n + 1) / len(mine))
            label = f"{case.name} ({n + 1}/{len(mine)})"
            row = _run_case(case, index, output, loaded, device, lambda f, stage: part(f, f"{label}: {stage}"),
                            cancel, method_options, rank)
            rows.append(row)
            if on_case is not None:
                on_case({k: v for k, v in row.items() if not k.startswith("_")})
    except Cancelled:
        raise Cancelled(f"cancelled by the user after {len(rows)} of {len(mine)} case(s); the finished cases' "
                        "folders are complete, the case in progress wrote nothing, and no summary was written"
                        ) from None
    rows = sorted(_gather(rows, world), key=lambda row: row["_index"])
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    if rank == 0:
        _write_summary(output / SUMMARY_NAME, rows, summary_columns(loaded.card, distributed=world > 1))
    return rows
