"""Hostile inputs to `transferseg evaluate --model M --data DIR [-o CSV]`.

Each case ends with exit status 2 and exactly one line on stderr, ``transferseg: error: …``, that
names the problem; no traceback; every file in the case folder (the model, the data folder and
whatever lies beside it) is byte-for-byte unchanged, and no volume was read: each is refused
before the first case is evaluated.  Four groups: an ``-o`` that is one of the inputs, a
``dataset.json`` or a file name that used to end in a traceback, a data set that leads outside
``--data``, and FIFOs or other files that are no regular file (guarded by an alarm, so a
regression fails instead of hanging).  Last, a card or a file name that tries to forge a
``PROGRESS`` line: the run succeeds and prints every user string on its own line's terms.

The cases call ``cli.main`` in-process, from inside the case folder.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import stat
from pathlib import Path

import pytest
from test_hostile_inputs import _signal_handlers_restored, assert_one_clear_line  # noqa: F401 (a fixture)

from TransferSegLib import datasets, evaluation, io
from TransferSegLib.cli import main
from TransferSegLib.datasets import find_cases
from TransferSegLib.io import save_labelmap, save_volume
from TransferSegLib.phantoms import ct_phantom


@functools.lru_cache(maxsize=None)
def _phantom():
    return ct_phantom(seed=11, shape=(8, 32, 32))


def _pair(image: Path, label: Path) -> None:
    """A labelled CT phantom as ``image`` and ``label`` (folders made as needed)."""
    volume, labels = _phantom()
    for path in (image, label):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_volume(volume, image)
    save_labelmap(labels, volume, label)


def _snapshot(root: Path) -> dict:
    """Every entry under ``root``: a regular file by its sha256, a link by its target, anything else
    (a FIFO, a folder) by its type and size, read with ``os.lstat`` only, so a FIFO is never opened."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[str(path)] = f"<link to {os.readlink(path)}>"
            elif stat.S_ISREG(info.st_mode):
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() + f" ino {info.st_ino}"
            else:
                state[str(path)] = f"<mode {stat.S_IFMT(info.st_mode):o}, {info.st_size} bytes>"
    return state


class Case:
    """A case folder: the tiny model copied into ``model/``, the data set in ``data/``."""

    def __init__(self, root: Path, tiny_model: Path):
        self.root, self.data = root, root / "data"
        self.model_dir = root / "model"
        self.model_dir.mkdir()
        card = json.loads(tiny_model.read_text(encoding="utf-8"))
        shutil.copy(tiny_model.with_name(card["weights"]["file"]), self.model_dir / card["weights"]["file"])
        self.card = self.model_dir / tiny_model.name
        self.weights = self.model_dir / card["weights"]["file"]
        self.card.write_text(json.dumps(card), encoding="utf-8")

    def edit_card(self, edit) -> None:
        card = json.loads(self.card.read_text(encoding="utf-8"))
        edit(card)
        self.card.write_text(json.dumps(card), encoding="utf-8")

    def phantoms(self) -> Path:
        """The TransferSeg phantom layout: data/ct_000.nii.gz + data/ct_000_label.nii.gz."""
        _pair(self.data / "ct_000.nii.gz", self.data / "ct_000_label.nii.gz")
        return self.data

    def decathlon(self, training=None) -> Path:
        """A Decathlon folder with one case; ``training`` replaces dataset.json's list (None: the right one)."""
        _pair(self.data / "imagesTr" / "liver_0.nii.gz", self.data / "labelsTr" / "liver_0.nii.gz")
        if training is None:
            training = [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]
        self.description({"name": "Liver", "training": training})
        return self.data

    def description(self, meta) -> Path:
        return _write(self.data / "dataset.json", json.dumps(meta))

    def secret(self, name="patient.nii.gz") -> Path:
        """A volume beside the data folder, which the command must not read."""
        _pair(self.root / "secret" / name, self.root / "secret" / f"label-{name}")
        return self.root / "secret" / name

    def evaluate(self, *extra) -> list:
        return ["evaluate", "--model", str(self.card), "--data", str(self.data), "--device", "cpu", *map(str, extra)]


def _write(path: Path, text) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# --- -o is one of the inputs -----------------------------------------------------------------------
def _hard_link(c: Case) -> list:
    c.phantoms()
    os.link(c.data / "ct_000_label.nii.gz", c.root / "metrics.csv")
    return c.evaluate("-o", c.root / "metrics.csv")


def _symbolic_link(c: Case) -> list:
    c.phantoms()
    (c.root / "table.csv").symlink_to(c.data / "ct_000.nii.gz")
    return c.evaluate("-o", "table.csv")


OVERWRITES = {
    "-o the label map (relative path)": (lambda c: (c.phantoms(), c.evaluate("-o", "data/ct_000_label.nii.gz"))[1],
                                         r"metrics table data/ct_000_label\.nii\.gz would overwrite the input"),
    "-o the image (absolute path)": (lambda c: (c.phantoms(), c.evaluate("-o", c.data / "ct_000.nii.gz"))[1],
                                     r"ct_000\.nii\.gz would overwrite the input .*ct_000\.nii\.gz"),
    "-o the model's card": (lambda c: (c.phantoms(), c.evaluate("-o", c.card))[1],
                            r"would overwrite the input .*model/tiny-unet3d\.json"),
    "-o the model's weights": (lambda c: (c.phantoms(), c.evaluate("-o", c.weights))[1],
                               r"would overwrite the input .*\.safetensors"),
    "-o a hard link of the label map": (_hard_link, r"metrics\.csv would overwrite the input .*ct_000_label"),
    "-o a link to the image": (_symbolic_link, r"table\.csv would overwrite the input .*ct_000\.nii\.gz"),
    "-o the Decathlon dataset.json": (lambda c: c.evaluate("-o", c.decathlon() / "dataset.json"),
                                      r"would overwrite the input .*dataset\.json"),
    "-o a Decathlon label map via ..": (lambda c: (c.decathlon(), c.evaluate("-o", "data/imagesTr/../labelsTr/"
                                                                                    "liver_0.nii.gz"))[1],
                                        r"would overwrite the input .*labelsTr/liver_0\.nii\.gz"),
}


# --- a dataset.json or a file name that used to end in a traceback ---------------------------------
def _lone_surrogate(c: Case) -> list:
    c.decathlon()
    # a JSON escape for half a UTF-16 pair: a str Python cannot encode as a file name
    _write(c.data / "dataset.json", '{"training": [{"image": "./imagesTr/\\udcff.nii.gz"}]}')
    return c.evaluate()


TRACEBACKS = {
    "dataset.json nested 5,000 deep": (lambda c: (_write(c.data / "dataset.json", "[" * 5000 + "]" * 5000),
                                                  c.evaluate())[1], "dataset.json is nested too deeply"),
    "a NUL in a dataset.json path": (lambda c: (c.decathlon([{"image": "./imagesTr/a\u0000b.nii.gz"}]),
                                                c.evaluate())[1],
                                     r"training image '\./imagesTr/a\\x00b\.nii\.gz': the path holds a NUL"),
    "a LiTS volume without a number": (lambda c: (_pair(c.data / "volume-abc.nii.gz", c.data / "seg.nii.gz"),
                                                  c.evaluate())[1],
                                       r"volume-abc\.nii\.gz: a LiTS volume is named volume-N\.nii"),
    "a 5,000-digit number in dataset.json": (lambda c: (_write(c.data / "dataset.json", '{"x": ' + "9" * 5000 + "}"),
                                                        c.evaluate())[1],
                                             "dataset.json: not a readable Decathlon dataset description"),
    "dataset.json not UTF-8": (lambda c: (_write(c.data / "dataset.json", b'{"name": "\xff\xfe"}'),
                                          c.evaluate())[1], r"dataset\.json: not a readable .*utf-8"),
    "a dataset.json path no file system can hold": (_lone_surrogate, r"training image .*: the name is not valid UTF-8"),
    "dataset.json a list": (lambda c: (c.description([["./imagesTr/a.nii.gz"]]), c.evaluate())[1],
                            r'"training" must be a list of'),
}


# --- a data set that leads outside --data ----------------------------------------------------------
def _label_beside_the_data_folder(c: Case) -> list:
    _pair(c.data / "volume-1.nii.gz", c.root / "elsewhere" / "segmentation-1.nii.gz")
    return c.evaluate()


def _image_link_out(c: Case) -> list:
    c.phantoms()
    (c.data / "ct_000_label.nii.gz").unlink()
    (c.data / "ct_000_label.nii.gz").symlink_to(c.secret().with_name("label-patient.nii.gz"))
    return c.evaluate()


def _images_folder_link_out(c: Case) -> list:
    c.secret()
    c.data.mkdir()
    (c.data / "imagesTr").symlink_to(c.root / "secret", target_is_directory=True)
    c.description({"name": "no training list: imagesTr/ and labelsTr/ paired by name"})
    return c.evaluate()


def _lits_volume_link_out(c: Case) -> list:
    _pair(c.data / "batch" / "volume-2.nii.gz", c.data / "batch" / "segmentation-2.nii.gz")
    (c.data / "batch" / "volume-2.nii.gz").unlink()
    (c.data / "batch" / "volume-2.nii.gz").symlink_to(c.secret())
    return c.evaluate()


OUTSIDE = {
    "a LiTS label beside --data, not in it": (_label_beside_the_data_folder,
                                              r"data: 1 case\(s\) have no label map \(lits-1\)"),
    "a dataset.json image in ../secret": (lambda c: (c.secret(), c.decathlon([{
        "image": "../secret/patient.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]), c.evaluate())[2],
        r"training image '\.\./secret/patient\.nii\.gz': leads outside the data folder"),
    "an absolute dataset.json label": (lambda c: c.decathlon([{
        "image": "./imagesTr/liver_0.nii.gz", "label": str(c.secret().with_name("label-patient.nii.gz"))}]) and
        c.evaluate(), r"training label '/.*label-patient\.nii\.gz': leads outside the data folder"),
    "a phantom label linked out of the folder": (_image_link_out,
                                                 r"ct_000_label\.nii\.gz: leads outside the data folder .*secret"),
    "imagesTr/ a link out of the folder": (_images_folder_link_out,
                                           r"imagesTr/\S*patient\.nii\.gz: leads outside the data folder"),
    "a LiTS volume linked out of the folder": (_lits_volume_link_out,
                                               r"volume-2\.nii\.gz: leads outside the data folder"),
}


# --- FIFOs and other files that are no regular file -------------------------------------------------
def _big_description(c: Case) -> list:
    c.decathlon()
    with open(c.data / "dataset.json", "r+b") as f:  # sparse: 65 MiB that cost no disk
        f.truncate(65 << 20)
    return c.evaluate()


SPECIAL = {
    "dataset.json a FIFO": (lambda c: (_fifo(c.data / "dataset.json"), c.evaluate())[1],
                            r"dataset\.json: this is a FIFO \(named pipe\), not a regular file"),
    "a phantom image a FIFO": (lambda c: (_write(c.data / "ct_000_label.nii.gz", b"label"),
                                          _fifo(c.data / "ct_000.nii.gz"), c.evaluate())[2],
                               r"ct_000\.nii\.gz: this is a FIFO \(named pipe\)"),
    "a Decathlon label a FIFO": (lambda c: (c.decathlon([{"image": "./imagesTr/liver_0.nii.gz",
                                                          "label": "./labelsTr/pipe.nii.gz"}]),
                                            _fifo(c.data / "labelsTr" / "pipe.nii.gz"), c.evaluate())[2],
                                 r"training label '\./labelsTr/pipe\.nii\.gz': this is a FIFO"),
    "a LiTS label a FIFO": (lambda c: (_write(c.data / "volume-3.nii", b"v"), _fifo(c.data / "segmentation-3.nii"),
                                       c.evaluate())[2], r"segmentation-3\.nii: this is a FIFO"),
    "dataset.json a folder": (lambda c: ((c.data / "dataset.json").mkdir(parents=True), c.evaluate())[1],
                              r"dataset\.json: this is a folder, not a regular file"),
    "a dataset.json of 65 MiB": (_big_description, r"dataset\.json is 65 MiB; a Decathlon dataset description"),
}

CASES = {**OVERWRITES, **TRACEBACKS, **OUTSIDE, **SPECIAL}


class Hung(BaseException):
    """Raised by the alarm: the command blocked (a FIFO opened for reading waits for a writer)."""


@pytest.fixture(autouse=True)
def _no_hang_and_signals_restored():
    """An alarm turns a hang into a failure; the CLI's SIGINT/SIGTERM handlers do not outlive the case."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}

    def hung(signum, frame):
        raise Hung("the command blocked for 20 s")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_evaluation_gets_one_clear_line_and_exit_2(name, tmp_path, tiny_model, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # relative -o and stray writes land in the snapshot
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    case = Case(tmp_path, tiny_model)
    build, fragment = CASES[name]
    argv = build(case)
    read, evaluated = [], []
    for module in (io, datasets):  # wherever a volume is read
        monkeypatch.setattr(module, "load_volume", lambda path: read.append(path))
    monkeypatch.setattr(evaluation, "run", lambda *args, **kwargs: evaluated.append(args))
    before = _snapshot(tmp_path)
    capfd.readouterr()
    status = main(argv)
    out, err = capfd.readouterr()
    assert_one_clear_line(name, status, out, err, fragment)
    assert not read and not evaluated, f"{name}: read {read} before refusing"
    after = _snapshot(tmp_path)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"{name}: files created, changed or removed: {changed}"


def test_each_group_has_at_least_three_cases_and_each_its_own_message():
    assert all(len(group) >= 3 for group in (OVERWRITES, TRACEBACKS, OUTSIDE, SPECIAL))
    assert len({fragment for _, fragment in CASES.values()}) == len(CASES)


def test_lits_labels_inside_the_data_folder_are_still_found(tmp_path):
    """volumes/ and segmentations/ side by side, and a batch folder holding both: each volume gets its own."""
    _pair(tmp_path / "volumes" / "volume-0.nii", tmp_path / "segmentations" / "segmentation-0.nii")
    _pair(tmp_path / "batch" / "volume-1.nii", tmp_path / "batch" / "segmentation-1.nii")
    shutil.copy(tmp_path / "batch" / "segmentation-1.nii", tmp_path / "segmentations" / "segmentation-1.nii")
    cases = find_cases(tmp_path)
    assert [(c.name, c.label_path) for c in cases] == [
        ("lits-0", (tmp_path / "segmentations" / "segmentation-0.nii").resolve()),
        ("lits-1", (tmp_path / "batch" / "segmentation-1.nii").resolve()),  # the one beside it, not the other
    ]


# --- a card or a file name that tries to forge a PROGRESS line ---------------------------------------
FORGED = "\nPROGRESS 0.5000 forged"


def _forged_name(c: Case) -> list:
    c.phantoms()
    c.edit_card(lambda card: card.update(name="tiny" + FORGED))
    return c.evaluate("--progress-lines")


def _forged_regions(c: Case) -> list:
    c.phantoms()
    liver, tumor = "liver" + FORGED, "tumor\rPROGRESS 0.9000 forged"
    c.edit_card(lambda card: card.update(evaluation={"regions": {liver: [1, 2], tumor: [2]},
                                                     "tumor_burden": {"tumor": tumor, "liver": liver}}))
    return c.evaluate("--progress-lines")


def _forged_case_name(c: Case) -> list:
    _pair(c.data / f"ct{FORGED}.nii.gz", c.data / f"ct{FORGED}_label.nii.gz")
    return c.evaluate("--progress-lines", "-o", "metrics.csv")


FORGERIES = {"a card's name": _forged_name, "a card's region names": _forged_regions,
             "a case's file name": _forged_case_name}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_user_string_cannot_forge_a_progress_line(name, tmp_path, tiny_model, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    case = Case(tmp_path, tiny_model)
    argv = FORGERIES[name](case)
    before = {path: digest for path, digest in _snapshot(tmp_path).items() if not path.endswith("metrics.csv")}
    capfd.readouterr()
    status = main(argv)
    out, err = capfd.readouterr()
    assert status == 0, f"{name}: exit {status}\n{err}"
    progress = [line for line in re.split("[\n\r]", out + err) if line.startswith("PROGRESS")]
    assert progress and not [line for line in progress if "forged" in line], progress
    assert "forged" in out, "the forged string is printed, escaped on its line"
    assert "Traceback" not in out + err
    after = {path: digest for path, digest in _snapshot(tmp_path).items() if not path.endswith("metrics.csv")}
    assert after == before
