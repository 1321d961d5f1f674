"""Hostile inputs, round 2, the independent sweep's findings: arguments, links, special files,
card strings and commands the first modules did not reach (`compose`, argparse's own errors).

Each refused case ends with exit status 2 and exactly one stderr line that names the problem,
the case folder unchanged (the first round's harness); each odd-but-valid case runs.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from test_hostile_inputs import Case, _signal_handlers_restored, assert_one_clear_line, ct_source  # noqa: F401

from TransferSegLib.cli import main

POSIX = sys.platform != "win32"


@pytest.fixture
def case(tmp_path, tiny_model, tiny_heatmap_model, ct_source, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    return Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)


@pytest.fixture
def no_hang():
    """A read that blocks (a FIFO) fails the test after 30 s instead of hanging the run."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise AssertionError("the command blocked on a special file")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _lstat_snapshot(root: Path) -> dict:
    """Like the harness's snapshot, but links and special files (FIFOs) by what they are, never opened."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                state[str(path.relative_to(root))] = f"<link to {os.readlink(path)}>"
            elif path.is_dir() or not path.is_file():
                state[str(path.relative_to(root))] = "<folder>" if path.is_dir() else "<special>"
            else:
                state[str(path.relative_to(root))] = path.read_bytes()
    return state


def _card_with(c: Case, **changes) -> Path:
    return c.model_copy(lambda card: card.update(changes))


def _fifo_card(c: Case) -> Path:
    path = c.path("evil.json")
    os.mkfifo(path)
    return path


def _long_axis(c: Case, length: int) -> Path:
    import numpy as np
    from conftest import write_image

    return write_image(np.zeros((length, 1, 1), np.int16), c.path("long.nrrd"), spacing_ijk=(1, 1, 1))


def _batch_argv(c: Case, *sources) -> list:
    return ["segment", *map(str, sources), "-o", str(c.out), "--model", c.model, "--device", "cpu"]


def _fifo_weights(c: Case) -> Path:
    card = c.model_copy()
    card.with_suffix(".safetensors").unlink()
    os.mkfifo(card.with_suffix(".safetensors"))
    return card


def _loop(c: Case) -> Path:
    (c.dir / "loop1").symlink_to("loop2")
    (c.dir / "loop2").symlink_to("loop1")
    return c.dir / "loop1"


def _compose_over_itself(c: Case) -> list:
    card = c.model_copy()
    return ["compose", "-o", str(card.parent), "--name", card.stem, "--method", "single",
            "--component", f"network={card}"]


# name -> (argv from the case, the words of the one line)
REFUSED = {
    # arguments: argparse's own errors and empty paths are one line too
    "no -o": (lambda c: ["segment", str(c.ct())], r"the following arguments are required: -o/--output; see"),
    "-o empty": (lambda c: c.segment(c.ct())[:2] + ["-o", ""] + c.segment(c.ct())[4:], r"-o/--output: an empty path"),
    "input empty": (lambda c: ["segment", "", "-o", str(c.out)], r"argument input: an empty path names nothing"),
    "--model empty": (lambda c: c.segment(c.ct())[:4] + ["--model", ""], r"--model: an empty path names nothing"),
    "--roi empty": (lambda c: c.segment(c.ct(), "--roi="), r"--roi needs six comma-separated numbers"),
    "--count not a number": (lambda c: ["phantom", "ct", "-o", str(c.out), "--count", "abc"],
                             r"argument --count: invalid int value: 'abc'"),
    "unknown --fusion": (lambda c: c.segment(c.ct(), "--fusion", "mean"), r"argument --fusion: invalid choice"),
    "two cases whose names differ only in Unicode normalisation": (
        lambda c: _batch_argv(c, c.ct("caf\u00e9.nii.gz"), c.ct("cafe\u0301.nii.gz")),
        r"would both be written to the output folder"),
    "an axis longer than a NIfTI holds": (lambda c: c.segment(_long_axis(c, 40_000)), r"40000×1×1 voxels .* at most "
                                                                                       r"32,767 voxels along an axis"),
    "phantom with an output in the way": (lambda c: ((c.out / "gallery.png").mkdir(parents=True),
                                                     ["phantom", "ct", "-o", str(c.out), "--count", "2"])[1],
                                         r"gallery\.png is in the way"),
    # links
    "input a loop of links": (lambda c: c.segment(_loop(c)), r"loop1: cannot follow its links"),
    "-o inside a loop of links": (lambda c: c.segment(c.ct())[:2] + ["-o", str(_loop(c) / "sub")]
                                  + c.segment(c.ct())[4:], r"cannot follow its links"),
    "-o a dangling link": (lambda c: (c.out.symlink_to(c.root / "gone"), c.segment(c.ct()))[1],
                           r"is a link to .*gone, which does not exist"),
    # special files as a card
    "a FIFO as the card": (lambda c: c.segment(c.ct(), model=_fifo_card(c)), r"not a regular file"),
    "/dev/zero as the card": (lambda c: c.segment(c.ct(), model=Path("/dev/zero")), r"not a regular file"),
    "a FIFO as the weights file": (lambda c: c.segment(c.ct(), model=_fifo_weights(c)),
                                   r"tiny-unet3d\.safetensors: is not a regular file"),
    # card strings
    "an integer of 5,000 digits": (lambda c: c.segment(c.ct(), model=(lambda p: (p.write_text(
        p.read_text().replace('"version": "0.0.1"', '"version": "0.0.1", "metrics": {"n": ' + "9" * 5000 + "}"),
        encoding="utf-8"), p)[1])(c.model_copy())), r"not valid JSON \(Exceeds the limit"),
    "terminology ~~": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card["labels"][0].update(terminology="~~"))), r"labels\[0\]\.terminology must be"),
    "terminology without codes": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card["labels"][1].update(terminology="context~^^~^^"))), r"labels\[1\]\.terminology must be"),
    # compose
    "compose over its own component": (_compose_over_itself, r"would overwrite its component"),
    "compose an unknown method": (lambda c: ["compose", "-o", str(c.out), "--name", "x", "--method", "no-such",
                                             "--component", f"network={c.model}"], r"method 'no-such' is not one"),
    "compose --method-config nested deep": (lambda c: ["compose", "-o", str(c.out), "--name", "x", "--method", "single",
                                                       "--component", f"network={c.model}", "--method-config",
                                                       "[" * 5000 + "]" * 5000], r"nested too deeply"),
}
SPECIAL = {"a FIFO as the card", "/dev/zero as the card", "a FIFO as the weights file"}


POSIX_ONLY = SPECIAL | {"input a loop of links", "-o inside a loop of links"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.skipif(
    not POSIX and name in POSIX_ONLY, reason="POSIX special files and links")) for name in REFUSED])
def test_a_sweep_case_gets_one_clear_line_and_exit_2(name, case, capfd, tmp_path, no_hang):
    build, fragment = REFUSED[name]
    argv = build(case)
    snapshot = _lstat_snapshot
    before = snapshot(tmp_path)
    capfd.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's errors leave through SystemExit, as they do from the command
        status = exit_.code
    out, err = capfd.readouterr()
    assert_one_clear_line(name, status, out, err, fragment)
    assert snapshot(tmp_path) == before, f"{name}: files created, changed or removed"


def test_there_are_three_cases_or_more_of_each_kind():
    kinds = {"arguments": 10, "links": 3, "special files": 3, "card strings": 3, "compose": 3}
    assert len(REFUSED) == sum(kinds.values()) and min(kinds.values()) >= 3


# --- odd but valid -------------------------------------------------------------------------------
def test_a_card_name_and_label_with_dollars_draw_as_text(case, capfd, tmp_path):
    model = case.model_copy(lambda card: (card.update(name="tiny $\\notacommand$"),
                                          card["labels"][0].update(name="liver $\\frac{$")))
    capfd.readouterr()
    assert main(case.segment(case.ct(), model=model)) == 0, capfd.readouterr().err
    assert (case.out / "overview.png").stat().st_size > 1000


def test_a_card_with_a_byte_order_mark_is_read(case, capfd):
    model = case.model_copy()
    model.write_bytes(b"\xef\xbb\xbf" + model.read_bytes())
    capfd.readouterr()
    assert main(case.segment(case.ct(), model=model)) == 0, capfd.readouterr().err


@pytest.mark.parametrize("length", [200, 240])
def test_long_but_legal_names_are_written(length, case, capfd, tmp_path):
    """A legal 240-character output folder and case name: the temporary names must stay legal too."""
    source = case.ct("A" * (length - len(".nii.gz")) + ".nii.gz")
    out = tmp_path / ("L" * length)
    capfd.readouterr()
    assert main(["segment", str(source), str(case.ct()), "-o", str(out), "--model", case.model,
                 "--device", "cpu"]) == 0, capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(["A" * (length - len(".nii.gz")), "ct", "summary.csv"])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_compose_writes_beside_its_component_under_another_name(case, capfd):
    card = case.model_copy()
    capfd.readouterr()
    assert main(["compose", "-o", str(card.parent), "--name", "renamed", "--method", "single",
                 "--component", f"network={card}"]) == 0, capfd.readouterr().err
    assert json.loads((card.parent / "renamed.json").read_text(encoding="utf-8"))["name"] == "renamed"


@pytest.mark.skipif(not POSIX, reason="SIGTERM to a child process is POSIX")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_phantoms_are_written_leaves_no_folder_and_one_line(sig, tmp_path):
    import subprocess
    import time

    out = tmp_path / "ph"
    process = subprocess.Popen([sys.executable, "-m", "TransferSegLib.cli", "phantom", "ct", "-o", str(out),
                                "--count", "40"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(".tmp-" in p.name for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # some cases written into the staging folder
        process.send_signal(getattr(signal, sig))
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = err.decode("utf-8").splitlines()
    assert process.returncode == 130, err
    assert len(lines) == 1 and "interrupted" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no staging


def test_weights_linked_from_elsewhere_load_because_their_sha256_is_checked(case, capfd, tmp_path):
    """Unlike a volume's detached data, a weights file may be a link (a variant card sharing weights):
    what is loaded is only ever the bytes whose sha256 the card names."""
    card = case.model_copy()
    elsewhere = tmp_path / "store.safetensors"
    card.with_suffix(".safetensors").rename(elsewhere)
    card.with_suffix(".safetensors").symlink_to(elsewhere)
    capfd.readouterr()
    assert main(case.segment(case.ct(), model=card)) == 0, capfd.readouterr().err
