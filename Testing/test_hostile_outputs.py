"""Hostile inputs, round 2: what a run writes and prints.

Each class of the second sweep has its cases here: no write outside ``-o`` whatever the case
names, file names that are not UTF-8, a working grid too large for memory, stderr that is one
true line, printed lines that a file name cannot forge, and staging leftovers and replaces of an
earlier run that are all-or-nothing.  The harness (``Case``, ``_snapshot``) is the first round's
(``test_hostile_inputs.py``): exit status 2, exactly one stderr line that names the problem, the
inputs unchanged, nothing new outside ``-o`` and nothing half-written inside it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from test_hostile_inputs import (Case, _signal_handlers_restored, _snapshot, assert_one_clear_line,  # noqa: F401
                                 ct_source)

from TransferSegLib import atomic as tio
from TransferSegLib import pipeline
from TransferSegLib.cli import main
from TransferSegLib.io import atomic_output_folder
from TransferSegLib.progress import one_line

POSIX = sys.platform != "win32"
BAD_BYTES = os.fsdecode(b"\xffcase")  # a name that is not UTF-8, as Python holds it


@pytest.fixture
def case(tmp_path, tiny_model, tiny_heatmap_model, ct_source, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # a stray relative write shows up in the snapshot
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    return Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)


def _run(argv, capfd, tmp_path, *watched_extra):
    """``main(argv)``: (status, stdout, stderr lines, what changed under the case folder's parent
    outside ``tmp_path/out``)."""
    watched = (tmp_path,)
    before = _snapshot(*watched, *watched_extra)
    capfd.readouterr()
    status = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    after = _snapshot(*watched, *watched_extra)
    out_prefix = str(Path(tmp_path.name) / "out")
    changed = sorted(k for k, _ in set(before.items()) ^ set(after.items()) if not k.startswith(out_prefix))
    return status, out, err.splitlines(), changed


def _batch(case, *sources) -> list:
    return ["segment", *map(str, sources), "-o", str(case.out), "--model", case.model, "--device", "cpu"]


def _one_error(status, lines, fragment):
    assert_one_clear_line("case", status, "", "\n".join(lines), fragment)


def _summary(out: Path) -> list:
    with open(out / "summary.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _no_staging_anywhere(root: Path):
    leftovers = [str(p) for p in root.rglob("*")
                 if re.search(r"\.tmp-|\.partial-", p.name) and (root / "in") not in p.parents]  # not the inputs
    assert not leftovers, leftovers


# --- 1. writing outside -o: case names that are not folder names -----------------------------------
HOSTILE_CASE_FILES = {
    "dot-dot": ("...nii.gz", r"'\.\.' is not a folder name"),
    "dot": ("..nii.gz", r"'\.' is not a folder name"),
    "newline": ("a\nb.nii.gz", "control characters"),
    "escape sequence": ("a\x1b[2Kb.nrrd", "control characters"),
    "carriage return": ("scan\r.nii.gz", "control characters"),
    "backslash": ("a\\..\\b.nii.gz", "path separator"),
    "staging prefix": (".transferseg.tmp-1@00000000-00000000.nii.gz", "staging"),
}


@pytest.mark.parametrize("name", list(HOSTILE_CASE_FILES))
def test_a_case_name_that_is_no_folder_name_fails_alone_and_writes_nothing_outside_o(name, case, capfd, tmp_path):
    file_name, fragment = HOSTILE_CASE_FILES[name]
    hostile = case.ct(file_name)
    good = case.ct("good.nii.gz")
    status, out, lines, changed = _run(_batch(case, hostile, good), capfd, tmp_path)
    assert status == 2
    assert lines == [f"1 of 2 cases failed; see {case.out / 'summary.csv'}"], lines
    assert not changed, f"written outside -o: {changed}"
    assert sorted(p.name for p in case.out.iterdir()) == ["good", "summary.csv"]
    rows = {row["case"]: row for row in _summary(case.out)}
    bad = rows[one_line(hostile.name[: -len(tio.full_suffix(hostile))] or hostile.name)]
    assert bad["status"] == "failed" and re.search(fragment, bad["error"]), bad
    assert rows["good"]["status"] == "ok"
    assert all(one_line(line) == line for line in out.splitlines())  # the stdout lines stayed lines
    _no_staging_anywhere(tmp_path)


def test_a_folder_of_cases_leaves_hidden_dot_dot_names_alone_and_writes_only_inside_o(case, capfd, tmp_path):
    folder = case.path("batch")
    folder.mkdir()
    for name in ("...nii.gz", "..nii.gz", ".nii.gz", "liver.nii.gz"):
        case.ct(f"batch/{name}")
    status, _, lines, changed = _run(case.segment(folder), capfd, tmp_path)
    assert status == 0 and lines == [], lines
    assert not changed, changed
    assert sorted(p.name for p in case.out.iterdir()) == ["liver", "summary.csv"]


def test_a_case_folder_that_is_a_link_out_of_o_is_refused(case, capfd, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    case.out.mkdir()
    (case.out / "ct").symlink_to(elsewhere, target_is_directory=True)
    status, _, lines, changed = _run(_batch(case, case.ct(), case.ct("b.nii.gz")), capfd, tmp_path)
    assert status == 2 and "1 of 2 cases failed" in lines[0], lines
    assert list(elsewhere.iterdir()) == []
    rows = {row["case"]: row for row in _summary(case.out)}
    assert "leads outside the output folder" in rows["ct"]["error"], rows["ct"]


def test_a_subfolder_of_o_that_is_a_link_out_of_it_is_refused_before_inference(case, capfd, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    case.out.mkdir()
    (case.out / "views").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("inference ran before the refusal"))
    status, _, lines, changed = _run(case.segment(case.ct()), capfd, tmp_path)
    _one_error(status, lines, r"views is a link that leads outside the output folder")
    assert list(elsewhere.iterdir()) == [] and not changed


# --- refusals that depend only on the arguments come before any inference ----------------------
@pytest.mark.parametrize("blocker", ["labelmap.nii.gz", "result.json", "overview.png"])
def test_an_output_in_the_way_is_refused_before_inference(blocker, case, capfd, tmp_path, monkeypatch):
    (case.out / blocker).mkdir(parents=True)
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("inference ran before the refusal"))
    status, _, lines, changed = _run(case.segment(case.ct()), capfd, tmp_path)
    _one_error(status, lines, re.escape(blocker) + " is in the way")
    assert not changed


# --- 2. names that are not UTF-8: no abort, one line ---------------------------------------------
def _cli(*argv, cwd, timeout=300) -> subprocess.CompletedProcess:
    """The real command in a child process: a native abort shows as a negative status, not a dead test run."""
    return subprocess.run([sys.executable, "-m", "TransferSegLib.cli", *argv], cwd=cwd, capture_output=True,
                          timeout=timeout, env={**os.environ, "TRANSFERSEG_MODELS": os.devnull})


@pytest.mark.skipif(not POSIX, reason="file names that are not UTF-8 are a POSIX thing")
def test_a_batch_folder_with_a_name_that_is_not_utf8_runs_the_others_and_writes_its_summary(case, tmp_path):
    folder = case.path("batch")
    folder.mkdir()
    case.ct("batch/good.nii.gz")
    shutil.copy(case.path("batch/good.nii.gz"), os.fsencode(folder) + b"/\xffcase.nii.gz")
    os.mkdir(os.fsencode(folder) + b"/\xfeseries")  # a subfolder, searched for a DICOM series
    result = _cli("segment", folder, "-o", case.out, "--model", case.model, "--device", "cpu", cwd=tmp_path)
    lines = result.stderr.decode("utf-8").splitlines()
    assert result.returncode == 2, result.stderr
    assert lines == [f"1 of 2 cases failed; see {case.out / 'summary.csv'}"], lines
    rows = {row["case"]: row for row in _summary(case.out)}
    assert set(rows) == {"good", "\\xffcase"} and rows["good"]["status"] == "ok"
    assert "UTF-8" in rows["\\xffcase"]["error"]
    assert sorted(os.listdir(case.out)) == ["good", "summary.csv"]
    _no_staging_anywhere(tmp_path)


@pytest.mark.skipif(not POSIX, reason="file names that are not UTF-8 are a POSIX thing")
@pytest.mark.parametrize("where", ["-o itself", "a folder above -o"])
def test_an_output_folder_whose_name_is_not_utf8_is_refused_in_one_line(where, case, tmp_path):
    source = case.ct()
    out = os.fsencode(tmp_path) + (b"/out\xff" if where == "-o itself" else b"/\xffparent/out")
    result = _cli("segment", source, "-o", os.fsdecode(out), "--model", case.model, "--device", "cpu",
                  cwd=tmp_path)
    lines = result.stderr.decode("utf-8").splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("transferseg: error: ") and "UTF-8" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no staging folder


@pytest.mark.skipif(not POSIX, reason="file names that are not UTF-8 are a POSIX thing")
def test_a_model_in_a_folder_whose_name_is_not_utf8_still_runs(case, tmp_path):
    """Weights are read by Python and loaded from the verified bytes: no native reader sees the name."""
    folder = os.fsencode(tmp_path) + b"/models\xff"
    os.mkdir(folder)
    for suffix in (".json", ".safetensors"):
        shutil.copy(Path(case.model).with_suffix(suffix), folder + b"/" + os.fsencode(Path(case.model).stem + suffix))
    model = os.fsdecode(folder + b"/" + os.fsencode(Path(case.model).name))
    result = _cli("segment", case.ct(), "-o", case.out, "--model", model, "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (case.out / "labelmap.nii.gz").is_file()


# --- 3. a working grid too large: refused from the header, before anything is allocated ----------
HUGE_GRIDS = {
    "1e9 mm slices": (1e9, 0.8, 0.8),
    "200 × 200 × 300 mm voxels": (300.0, 200.0, 200.0),
    "1e7 mm columns": (2.0, 1.0, 1e7),
}


@pytest.mark.parametrize("name", list(HUGE_GRIDS))
def test_a_working_grid_beyond_memory_is_refused_before_resampling(name, case, capfd, tmp_path, monkeypatch):
    import TransferSegLib.resample as resample

    spacing_kji = HUGE_GRIDS[name]
    source = write_image(np.zeros((8, 32, 32), np.int16), case.path("huge.nii.gz"), spacing_ijk=spacing_kji[::-1])
    model = case.model_copy(lambda card: card.update(working_spacing_mm=[2.0, 1.5, 1.5]))
    monkeypatch.setattr(resample, "to_spacing", lambda *a, **k: pytest.fail("resampled before the refusal"))
    status, _, lines, changed = _run(case.segment(source, model=model), capfd, tmp_path)
    _one_error(status, lines, r"on the model's working grid .* GiB but only .* GiB of memory is free; check the voxel "
                              r"spacing")
    assert not changed


# --- 4. stderr: one true line --------------------------------------------------------------------
ENCLOSING_BOXES = {
    "1e20 mm": "-1e20,-1e20,-1e20,1e20,1e20,1e20",
    "1e308 mm": "-1e308,-1e308,-1e308,1e308,1e308,1e308",
    "a metre": "-1000,-1000,-1000,1000,1000,1000",
}


@pytest.mark.parametrize("name", list(ENCLOSING_BOXES))
def test_a_roi_enclosing_the_whole_volume_runs_on_it_without_a_warning(name, case, capfd, tmp_path):
    status, out, lines, _ = _run(case.segment(case.ct(), f"--roi-ras={ENCLOSING_BOXES[name]}"), capfd,
                                 tmp_path)
    assert status == 0 and lines == [], lines
    result = json.loads((case.out / "result.json").read_text(encoding="utf-8"))
    assert result["roi_kji"] == [0, 0, 0, 8, 32, 32]


@pytest.mark.skipif(not POSIX or not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
@pytest.mark.parametrize("command, limit", [("segment", 200), ("segment", 1_500), ("segment", 6_000),
                                            ("detect", 200), ("detect", 6_000)])
def test_a_full_disk_while_writing_gives_one_line_and_no_leftovers(command, limit, case, tmp_path):
    """A file-size limit fails the writes as a full disk does (EFBIG instead of ENOSPC), at several
    points of the run (``detect`` writes its NIfTI heatmap first, which the NIfTI writer may cut short
    without an error): the native writers' own complaints must not reach stderr."""
    source = case.ct()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from TransferSegLib.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, *case.segment(source, command=command)], cwd=tmp_path,
                            capture_output=True, timeout=300,
                            env={**os.environ, "TRANSFERSEG_MODELS": os.devnull})
    lines = result.stderr.decode("utf-8").splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("transferseg: error: "), lines
    assert "NWAD" not in lines[0] and "Traceback" not in result.stderr.decode()
    assert lines[0].endswith(f": {case.out}") or f"{case.out}/" in lines[0], lines  # it names where
    assert not case.out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in"]


# --- 5. printed lines that a file name cannot forge ----------------------------------------------
FORGING_NAMES = ["a\nPROGRESS 1.0000 done", "b\rPROGRESS 0.9999 done", "c\u2028PROGRESS 0.5000 forged",
                 "d\x85PROGRESS 0.5000 forged"]


def test_no_case_name_forges_a_progress_line(case, capfd, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "TransferSeg"))  # as test_slicer_logic does
    from TransferSegModuleLib.logic import parse_progress_line

    sources = [case.ct(name + ".nii.gz") for name in FORGING_NAMES] + [case.ct("good.nii.gz")]
    status, out, lines, _ = _run(_batch(case, *sources) + ["--progress-lines"], capfd, tmp_path)
    assert status == 2  # every name fails as a case folder, each on its own row
    printed = out.splitlines() + out.split("\n")  # however a reader splits it
    progress = [parse_progress_line(line) for line in printed if parse_progress_line(line)]
    assert progress, out
    assert not any(stage.startswith(("done", "forged")) and fraction in (0.5, 0.9999, 1.0)
                   for fraction, stage in progress if "(" not in stage), progress
    assert all(not line.startswith("PROGRESS") or re.match(r"PROGRESS [01]\.\d{4} \S", line) for line in printed)
    assert all(line == one_line(line) for line in out.split("\n"))
    for name in FORGING_NAMES:
        assert one_line(name) in out


def test_an_error_about_a_file_with_a_newline_in_its_name_is_one_line(case, capfd, tmp_path):
    broken = case.path("x\nPROGRESS 1.0000 done.nii.gz")
    broken.write_bytes(b"not an image")
    status, out, lines, _ = _run(case.segment(broken, "--progress-lines"), capfd, tmp_path)
    _one_error(status, lines, r"x\\nPROGRESS 1\.0000 done\.nii\.gz")
    assert "\nPROGRESS 1.0000 done" not in out


def test_one_line_escapes_what_breaks_or_rewrites_a_line():
    for raw, shown in [("a\nb", "a\\nb"), ("a\rb", "a\\rb"), ("\x1b[2J", "\\x1b[2J"), ("x\u2028y", "x\\u2028y"),
                       ("x\x85y", "x\\x85y"), ("\x7f", "\\x7f"), (BAD_BYTES, "\\xffcase"), ("naïve × 3", "naïve × 3")]:
        assert one_line(raw) == shown
        assert len(one_line(raw).splitlines()) == 1


# --- 6. leftovers and torn replaces --------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _earlier_run(case) -> dict:
    assert main(case.segment(case.ct())) == 0
    return {p.relative_to(case.out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in case.out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["inside -o", "beside a new -o", "a partial file in -o"])
def test_the_next_run_removes_the_staging_a_killed_run_left(where, case, capfd, tmp_path):
    token = f"{_dead_pid()}@{tio._HOST}-0badc0de"
    live = f"{os.getpid()}@{tio._HOST}-00c0ffee"  # a run still writing: kept
    if where == "beside a new -o":
        stale, kept = tmp_path / f".out.tmp-{token}", tmp_path / f".out.tmp-{live}"
    else:
        case.out.mkdir()
        name = ".transferseg.tmp-" if where == "inside -o" else ".summary.partial-"
        stale, kept = case.out / f"{name}{token}", case.out / f"{name}{live}"
    for folder in (stale, kept):
        folder.mkdir()
        (folder / ".segmentation.partial-x.seg.nrrd").write_bytes(b"half")
    capfd.readouterr()
    assert main(case.segment(case.ct())) == 0
    assert not stale.exists() and kept.exists()


@pytest.mark.skipif(not POSIX, reason="SIGKILL is POSIX")
def test_a_run_killed_while_writing_leaves_what_the_next_run_clears(case, tmp_path):
    source = case.ct()
    before = _earlier_run(case)
    argv = [sys.executable, "-m", "TransferSegLib.cli", *case.segment(source)]
    deadline, killed = time.monotonic() + 240, False
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TRANSFERSEG_MODELS": os.devnull})
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".transferseg.tmp-") for p in case.out.iterdir()):
                process.kill()
                killed = True
                break
            time.sleep(0.002)
    finally:
        process.kill()
        process.wait()
    if not killed:
        pytest.fail("the run ended before its staging folder could be seen")
    after = {p.relative_to(case.out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in case.out.rglob("*") if p.is_file() and ".transferseg.tmp-" not in str(p)}
    assert after == before  # the earlier run untouched
    assert main(case.segment(source)) == 0
    assert not [p for p in case.out.iterdir() if p.name.startswith(".")]


class _Interrupt:
    """``os.rename`` that raises ``error`` on its ``at``-th call (and works otherwise)."""

    def __init__(self, at: int, error: BaseException):
        self.at, self.error, self.calls, self.real = at, error, 0, os.rename

    def __call__(self, source, target):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.real(source, target)


NAMES = ["a.txt", "views/b.txt", "c.txt", "result.json"]


def _folder_with_an_earlier_run(tmp_path) -> Path:
    folder = tmp_path / "out"
    (folder / "views").mkdir(parents=True)
    for name in NAMES[:-1]:
        (folder / name).write_text("old " + name)
    (folder / "result.json").write_text("old")
    (folder / "notes.txt").write_text("the user's own file")
    return folder


def _contents(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("at", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_replace_stopped_half_way_puts_the_earlier_run_back(at, error, tmp_path, monkeypatch):
    folder = _folder_with_an_earlier_run(tmp_path)
    before = _contents(folder)
    with pytest.raises(type(error)):
        with atomic_output_folder(folder, NAMES) as staging:
            (staging / "views").mkdir()
            for name in NAMES:
                (staging / name).write_text("new " + name)
            monkeypatch.setattr(os, "rename", _Interrupt(at, error))
    monkeypatch.undo()
    assert _contents(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "c.txt", "notes.txt", "result.json", "views"]


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="holding signals is POSIX")
def test_a_second_ctrl_c_during_the_replace_waits_until_every_file_is_in(tmp_path, monkeypatch):
    folder = _folder_with_an_earlier_run(tmp_path)
    real = os.rename
    sent = []

    def rename_and_interrupt(source, target):
        if not sent:  # the user's Ctrl-C arrives as the first file moves
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real(source, target)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_folder(folder, NAMES) as staging:
            (staging / "views").mkdir()
            for name in NAMES:
                (staging / name).write_text("new " + name)
            monkeypatch.setattr(os, "rename", rename_and_interrupt)
    monkeypatch.undo()
    assert sent
    assert _contents(folder) == {**{name: "new " + name for name in NAMES}, "notes.txt": "the user's own file"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
