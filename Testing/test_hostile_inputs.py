"""Hostile inputs to `transferseg segment | detect | train | evaluate`.

Each case is one bad volume, model, argument or output folder.  It must end with exit status 2
and exactly one line on stderr, ``transferseg: error: …``, that names the problem (the case's
fragment); every file the command was given is byte-for-byte unchanged, and nothing was left
behind: the whole case folder (inputs, models, output folder, its parent) is compared before
and after, so a temporary or half-written file anywhere fails the case.

The cases call ``cli.main`` in-process (a subprocess per case would spend most of the module's
time importing torch); the cancel case is a real subprocess that gets a real SIGINT.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tiny_multiview_recipe, write_image

from TransferSegLib.cli import main
from TransferSegLib.io import save_volume
from TransferSegLib.models import save_model
from TransferSegLib.nets import build_network
from TransferSegLib.phantoms import ct_phantom

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes through any permission
SMALL = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)


# --- what a case may not change ------------------------------------------------------------------
def _snapshot(*roots) -> dict:
    """Every file and folder under ``roots`` (hidden ones too): relative path → sha256, or a marker."""
    state = {}
    for root in map(Path, roots):
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                state[str(Path(folder, name).relative_to(root.parent))] = "<folder>"
            for name in files:
                path = Path(folder, name)
                try:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                except PermissionError:  # the permission-denied case's own input
                    stat = path.stat()
                    digest = f"<unreadable {stat.st_size} bytes, mtime {stat.st_mtime_ns}>"
                state[str(path.relative_to(root.parent))] = digest
    return state


def assert_one_clear_line(name: str, status, out: str, err: str, fragment: str) -> list:
    """What every refused case must give: exit 2, exactly one stderr line ``transferseg: error: …``
    that names the problem (``fragment``, a regular expression), no traceback; returns the lines."""
    lines = err.splitlines()
    assert status == 2, f"{name}: exit {status}\n{err}"
    assert len(lines) == 1 and lines[0].startswith("transferseg: error: "), f"{name}: stderr was\n{err}"
    assert re.search(fragment, lines[0]), f"{name}: {fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err
    return lines


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """The CLI turns SIGINT/SIGTERM into a cancel token; in-process that must not outlive the case."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory):
    """A small CT phantom file: the good volume the argument and output cases start from."""
    volume, _ = ct_phantom(seed=3, shape=(8, 32, 32))
    folder = tmp_path_factory.mktemp("hostile_ct")
    return save_volume(volume, folder / "ct.nii.gz")


class Case:
    """A case's folder: inputs go in ``dir``, ``out`` is the output folder (absent unless a case makes it).
    ``model`` is the tiny segmentation model, ``heatmap_model`` the tiny detection model."""

    def __init__(self, root: Path, model: Path, ct_source: Path, heatmap_model: Path):
        self.root, self.dir, self.out = root, root / "in", root / "out"
        self.dir.mkdir()
        self.model, self.heatmap_model, self._ct_source = str(model), str(heatmap_model), ct_source

    def path(self, name) -> Path:
        return self.dir / name

    def ct(self, name="ct.nii.gz") -> Path:
        return Path(shutil.copy(self._ct_source, self.path(name)))

    def segment(self, source, *extra, command="segment", model=None) -> list:
        """``command`` on ``source``, with the tiny model of the command's task unless ``model`` is given."""
        model = model or (self.heatmap_model if command == "detect" else self.model)
        return [command, str(source), "-o", str(self.out), "--model", str(model), "--device", "cpu",
                *map(str, extra)]

    def model_copy(self, edit=None, weights: bytes | None = None) -> Path:
        """The tiny model copied into the case folder, its card changed by ``edit`` or its weights replaced."""
        folder = self.path("model")
        folder.mkdir()
        card_path = folder / Path(self.model).name
        card = json.loads(Path(self.model).read_text(encoding="utf-8"))
        shutil.copy(Path(self.model).with_suffix(".safetensors"), folder / card["weights"]["file"])
        if edit is not None:
            edit(card)
        card_path.write_text(json.dumps(card), encoding="utf-8")
        if weights is not None:
            (folder / card["weights"]["file"]).write_bytes(weights)
        return card_path

    def weights(self) -> bytes:
        return Path(self.model).with_suffix(".safetensors").read_bytes()

    def train_config(self, name="config.json", **changes) -> Path:
        config = {"name": "hostile-tiny", "architecture": {"name": "unet3d", "config": {
                      "in_channels": 1, "out_channels": 3, "base_channels": 4, "levels": 2}},
                  "labels": [{"name": "liver", "label": 1}, {"name": "liver tumor", "label": 2}],
                  "data": {"phantom": "ct", "count": 2, "seed": 5, "options": {"shape": [8, 32, 32]}},
                  "patch_size": [8, 32, 32], "preprocessing": {"hu_window": [-200, 250]}, "threads": 1,
                  "stages": [{"steps": 1, "optimizer": {"name": "adam", "lr": 0.001}, "loss": "ce"}]}
        config.update(changes)
        path = self.path(name)
        path.write_text(json.dumps(config), encoding="utf-8")
        return path

    def train(self, config, *extra) -> list:
        return ["train", str(config), "-o", str(self.out), *map(str, extra)]

    def evaluate(self, data, *extra) -> list:
        return ["evaluate", "--model", self.model, "--data", str(data), "--device", "cpu", *map(str, extra)]


# --- hostile volumes -----------------------------------------------------------------------------
def _nifti_patched(c: Case, name: str, offset: int, fmt: str, values) -> Path:
    """An uncompressed NIfTI-1 whose header field at ``offset`` is overwritten (dim at 42, pixdim at 80)."""
    path = write_image(SMALL, c.path(name), compress=False)
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


def _nrrd_header(c: Case, name: str, replace: dict, detached: str | None = None) -> Path:
    """A raw NRRD with header lines replaced; with ``detached``, a header naming that data file instead."""
    good = write_image(SMALL, c.root / "scratch.nrrd", spacing_ijk=(1, 1, 1), origin_lps=(0, 0, 0), compress=False)
    header, data = good.read_bytes().split(b"\n\n", 1)
    good.unlink()
    for old, new in replace.items():
        assert old.encode() in header, old
        header = header.replace(old.encode(), new.encode())
    path = c.path(name)
    if detached:
        path.write_bytes(header + f"\ndata file: {detached}\n".encode())
    else:
        path.write_bytes(header + b"\n\n" + data)
    return path


def _truncated_nii_gz(c: Case) -> Path:
    path = write_image(SMALL, c.path("truncated.nii.gz"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path


def _four_d(c: Case) -> Path:
    path = c.path("series.nii.gz")
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(SMALL)] * 3), str(path))
    return path


def _rgb(c: Case) -> Path:
    path = c.path("photo.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    return path


def _mhd_without_raw(c: Case) -> Path:
    path = c.path("scan.mhd")
    sitk.WriteImage(sitk.GetImageFromArray(SMALL), str(path))
    c.path("scan.raw").unlink()
    return path


def _dicom_slice(c: Case) -> Path:
    path = c.path("IM0001.dcm")
    sitk.WriteImage(sitk.GetImageFromArray((SMALL[0] * 100).astype(np.int16)), str(path))
    return path


def _unreadable(c: Case) -> Path:
    path = write_image(SMALL, c.path("locked.nii.gz"))
    path.chmod(0)
    return path


def _folder_without_volumes(c: Case) -> Path:
    folder = c.path("scans")
    folder.mkdir()
    (folder / "README.txt").write_text("the scans are on the other disk\n", encoding="utf-8")
    return folder


def _folder_named_like_a_file(c: Case) -> Path:
    folder = c.path("ct.nii.gz")
    folder.mkdir()
    return folder


def _zero_size_axis(c: Case) -> Path:
    c.path("empty.raw").write_bytes(b"")
    return _nrrd_header(c, "empty.nhdr", {"sizes: 10 9 8": "sizes: 10 0 8"}, detached="empty.raw")


# --- hostile models ------------------------------------------------------------------------------
def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _pickle_file(c: Case, name: str) -> Path:
    path = c.path(name)
    path.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}))
    return path


def _weights_without_card(c: Case) -> Path:
    path = c.path("orphan.safetensors")
    path.write_bytes(c.weights())
    return path


def _unknown_method(c: Case) -> Path:
    card = json.loads(Path(c.model).read_text(encoding="utf-8"))
    spec = {k: card[k] for k in ("architecture", "preprocessing", "patch_size", "inference")}
    composed = {"name": "no-method", "version": "0.0.1", "task": "segmentation", "labels": card["labels"],
                "method": {"name": "no-such-method", "config": {}}, "components": {"network": spec}}
    torch.manual_seed(0)
    return save_model({"network": build_network("unet3d", spec["architecture"]["config"])}, composed, c.path("model"))


# --- hostile data folders for evaluate -----------------------------------------------------------
def _images_only(c: Case) -> Path:
    folder = c.path("data")
    folder.mkdir()
    c.ct("data/ct_000.nii.gz")
    return folder


def _msd(c: Case, dataset_json: str) -> Path:
    folder = c.path("msd")
    (folder / "imagesTr").mkdir(parents=True)
    c.ct("msd/imagesTr/liver_1.nii.gz")
    (folder / "dataset.json").write_text(dataset_json, encoding="utf-8")
    return folder


def _labelled(c: Case) -> Path:
    folder = c.path("data")
    folder.mkdir()
    volume, labels = ct_phantom(seed=11, shape=(8, 32, 32))
    from TransferSegLib.io import save_labelmap

    save_volume(volume, folder / "ct_000.nii.gz")
    save_labelmap(labels, volume, folder / "ct_000_label.nii.gz")
    return folder


# --- hostile output folders ----------------------------------------------------------------------
def _out_is_a_file(c: Case) -> list:
    c.out.write_text("not a folder\n", encoding="utf-8")
    return c.segment(c.ct())


def _out_under_a_file(c: Case) -> list:
    c.path("notes.txt").write_text("not a folder\n", encoding="utf-8")
    c.out = c.path("notes.txt") / "results"
    return c.segment(c.ct())


def _out_read_only(c: Case) -> list:
    locked = c.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    c.out = locked / "results"
    return c.segment(c.ct())


def _out_overwrites_input(c: Case) -> list:
    source = c.ct("labelmap.nii.gz")  # the name of a file that segment writes
    c.out = c.dir
    return c.segment(source)


def _input_among_the_outputs(c: Case) -> list:
    c.out.mkdir()
    source = Path(shutil.copy(c._ct_source, c.out / "labelmap.nii.gz"))  # a label map of an earlier run as input
    return c.segment(source)


def _batch_input_among_a_case_outputs(c: Case) -> list:
    (c.out / "labelmap").mkdir(parents=True)
    source = Path(shutil.copy(c._ct_source, c.out / "labelmap" / "labelmap.nii.gz"))  # case "labelmap"
    command, first, *rest = c.segment(c.ct())
    return [command, first, str(source), *rest]


def _out_blocked_by_a_folder(c: Case) -> list:
    (c.out / "labelmap.nii.gz").mkdir(parents=True)
    return c.segment(c.ct())


def _train_into_a_file(c: Case) -> list:
    c.out.write_text("not a folder\n", encoding="utf-8")
    return c.train(c.train_config(), "--max-steps", "1")


def _train_recipe_into_a_file(c: Case) -> list:
    c.out.write_text("not a folder\n", encoding="utf-8")
    config = c.path("recipe.json")
    config.write_text(json.dumps(tiny_multiview_recipe()), encoding="utf-8")
    return c.train(config, "--max-steps", "1")


# name → (build the argv in the case folder, the words of the message that name the problem)
CASES = {
    # volumes
    "2D NIfTI": (lambda c: c.segment(write_image(SMALL[0], c.path("slice.nii.gz"), spacing_ijk=(1, 1),
                                                 origin_lps=(0, 0), direction_lps=np.eye(2))), r"input is 2D \(9×10\)"),
    "4D NIfTI": (lambda c: c.segment(_four_d(c), command="detect"), r"4D .*3 volumes"),
    "truncated .nii.gz": (lambda c: c.segment(_truncated_nii_gz(c)), "truncated"),
    "zero-byte file": (lambda c: c.segment((c.path("empty.nii.gz").write_bytes(b""), c.path("empty.nii.gz"))[1]),
                       r"empty \(0 bytes\)"),
    "text file named .nii.gz": (
        lambda c: c.segment((c.path("notes.nii.gz").write_text("patient notes\n" * 40, encoding="utf-8"),
                             c.path("notes.nii.gz"))[1]), "not a readable .nii.gz image"),
    "gzipped text named .nii.gz": (
        lambda c: c.segment((gzip.open(c.path("notes.nii.gz"), "wb").write(b"patient notes\n" * 40),
                             c.path("notes.nii.gz"))[1], command="detect"), "not a readable .nii.gz image"),
    "NaN voxels": (lambda c: c.segment(write_image(np.where(SMALL > 1.5, np.nan, SMALL), c.path("nan.nii.gz"))),
                   "NaN or infinite"),
    "infinite voxels": (lambda c: c.segment(write_image(np.where(SMALL > 1.5, -np.inf, SMALL), c.path("inf.nrrd")),
                                            command="detect"), "NaN or infinite"),
    "huge declared size, little data": (lambda c: c.segment(_nifti_patched(c, "huge.nii", 42, "<3h", (30000,) * 3)),
                                        "GiB of memory is free"),
    "zero spacing": (lambda c: c.segment(_nrrd_header(c, "zero.nrrd", {"(0,0,1)": "(0,0,0)"})), "zero, negative"),
    "negative spacing": (lambda c: c.segment(_nifti_patched(c, "negative.nii", 80, "<f", (-2.0,))), "zero, negative"),
    "non-invertible direction": (lambda c: c.segment(_nrrd_header(c, "singular.nrrd", {"(0,0,1)": "(0,1,0)"})),
                                 "singular"),
    "NRRD header without its data file": (
        lambda c: c.segment(_nrrd_header(c, "scan.nhdr", {}, detached="scan.raw")), r"voxel data file, scan\.raw"),
    "MetaImage header without its .raw": (lambda c: c.segment(_mhd_without_raw(c), command="detect"),
                                          r"voxel data file, scan\.raw"),
    "zero-size axis": (lambda c: c.segment(_zero_size_axis(c)), "zero-size axis"),
    "folder with no volumes": (lambda c: c.segment(_folder_without_volumes(c)), "no DICOM image series"),
    "non-existent path": (lambda c: c.segment(c.path("missing.nii.gz"), command="detect"), "no such file"),
    "folder where a file is expected": (lambda c: c.segment(_folder_named_like_a_file(c)),
                                        "a folder, not an image file"),
    "a single DICOM slice": (lambda c: c.segment(_dicom_slice(c)), r"input is 2D \(10×9, a single DICOM slice\)"),
    "colour volume": (lambda c: c.segment(_rgb(c), command="detect"), "3 components per voxel"),
    "unreadable file": (lambda c: c.segment(_unreadable(c)), "permission denied"),
    # models and weights
    "missing weights file": (lambda c: c.segment(c.ct(), model=(lambda p: (p.with_suffix(".safetensors").unlink(), p)[1])(
        c.model_copy())), "weights file tiny-unet3d.safetensors is missing"),
    "weights sha256 mismatch": (lambda c: c.segment(c.ct(), model=c.model_copy(weights=_flip_last_byte(c.weights()))),
                                "checksum mismatch"),
    "truncated weights": (lambda c: c.segment(c.ct(), model=c.model_copy(weights=c.weights()[:-100])), "truncated"),
    "a .pt pickle as --model": (lambda c: c.segment(c.ct(), model=_pickle_file(c, "model.pt")),
                                r"refusing to load a PyTorch pickle \(\.pt\)"),
    "a .pth pickle as --model": (lambda c: c.segment(c.ct(), command="detect", model=_pickle_file(c, "model.pth")),
                                 r"refusing to load a PyTorch pickle \(\.pth\)"),
    "a pickle named .safetensors": (lambda c: c.segment(c.ct(), model=c.model_copy(weights=pickle.dumps({"w": 1}))),
                                    "PyTorch pickle"),
    "weights without a card": (lambda c: c.segment(c.ct(), model=_weights_without_card(c)), "model card is missing"),
    "malformed card JSON": (lambda c: c.segment(c.ct(), model=(lambda p: (p.write_text('{"name": "x",', "utf-8"), p)[1])(
        c.model_copy())), "not valid JSON"),
    "card that is a JSON list": (lambda c: c.segment(c.ct(), model=(lambda p: (p.write_text("[1, 2]", "utf-8"), p)[1])(
        c.model_copy())), "must be a JSON object"),
    "unknown architecture": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card["architecture"].update(name="resnet9000"))), "unknown architecture 'resnet9000'"),
    "weights that do not fit": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card["architecture"]["config"].update(base_channels=8))), "weights do not fit"),
    "card without patch_size": (lambda c: c.segment(c.ct(), model=c.model_copy(lambda card: card.pop("patch_size"))),
                                "lacks patch_size"),
    "architecture not an object": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card.update(architecture="unet3d"))), "architecture must be"),
    "labels not a list": (lambda c: c.segment(c.ct(), model=c.model_copy(lambda card: card.update(labels="liver"))),
                          "labels must be a list"),
    "unknown task": (lambda c: c.segment(c.ct(), model=c.model_copy(lambda card: card.update(task="classification"))),
                     "task must be"),
    "card without a sha256": (lambda c: c.segment(c.ct(), model=c.model_copy(lambda card: card["weights"].pop("sha256"))),
                              "no weights.sha256"),
    "weights outside the card's folder": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card["weights"].update(file="../../elsewhere.safetensors"))), "a file name beside the card"),
    "bad architecture setting": (lambda c: c.segment(c.ct(), model=c.model_copy(
        lambda card: card["architecture"]["config"].update(base_channels="four"))), "base_channels"),
    "unknown method": (lambda c: c.segment(c.ct(), model=_unknown_method(c)), "method 'no-such-method'"),
    "unknown model name": (lambda c: c.segment(c.ct(), model="no-such-model"), "no model named 'no-such-model'"),
    "missing card path": (lambda c: c.segment(c.ct(), model=c.path("gone.json")), "no such model file"),
    "detect with a segmentation model": (lambda c: c.segment(c.ct(), command="detect", model=c.model),
                                         r"tiny-unet3d is a segmentation model.*use `transferseg segment`"),
    "segment with a detection model": (lambda c: c.segment(c.ct(), model=c.heatmap_model),
                                       r"tiny-heatmap is a heatmap \(lesion detection\) model.*use `transferseg detect`"),
    # arguments
    "--device nonsense": (lambda c: c.segment(c.ct(), "--device", "gpu9"), "unknown device 'gpu9'"),
    "--roi malformed": (lambda c: c.segment(c.ct(), "--roi", "1,2,3"), "six comma-separated numbers"),
    "--roi out of bounds": (lambda c: c.segment(c.ct(), "--roi", "0,0,0,100,32,32"), "reaches outside the volume"),
    "--roi empty": (lambda c: c.segment(c.ct(), "--roi", "0,0,0,0,32,32"), "is empty"),
    "--roi with NaN": (lambda c: c.segment(c.ct(), "--roi", "nan,0,0,4,32,32"), r"roi must be \(k0"),
    "--roi with infinity": (lambda c: c.segment(c.ct(), "--roi", "0,0,0,inf,32,32", command="detect"),
                            r"roi must be \(k0"),
    "--roi between voxels": (lambda c: c.segment(c.ct(), "--roi", "0,0,0,4.5,32,32"), "whole voxel indices"),
    "--roi-ras outside the volume": (lambda c: c.segment(c.ct(), "--roi-ras", "1000,1000,1000,1010,1010,1010"),
                                     r"RAS box from \(1000, 1000, 1000\).*does not overlap"),
    "--fusion on a single-network model": (lambda c: c.segment(c.ct(), "--fusion", "staple"),
                                           "--fusion does not apply"),
    # train
    "negative --max-steps": (lambda c: c.train(c.train_config(), "--max-steps", "-3"), "max_steps"),
    "train config not JSON": (lambda c: c.train((c.path("c.json").write_text("{name: x", "utf-8"), c.path("c.json"))[1]),
                              "not valid JSON"),
    "train config with an unknown key": (lambda c: c.train(c.train_config(epochz=3)), "epochz: unknown key"),
    "train config with negative steps": (lambda c: c.train(c.train_config(stages=[
        {"steps": -5, "optimizer": {"name": "adam", "lr": 0.001}, "loss": "ce"}])), r"stages\[0\]\.steps"),
    "train config missing": (lambda c: c.train(c.path("none.json")), "no such training config"),
    "train data folder missing": (lambda c: c.train(c.train_config(data={"root": "nowhere"})), "no such data folder"),
    "train -o an existing file": (lambda c: _train_into_a_file(c), "output folder .* is an existing file"),
    "train a recipe -o an existing file": (_train_recipe_into_a_file, r"output folder .*out is an existing file; give"),
    # evaluate
    "evaluate data without labels": (lambda c: c.evaluate(_images_only(c)), "found no image/label pairs"),
    "evaluate Decathlon folder without labelsTr": (lambda c: c.evaluate(_msd(c, "{}")), "have no label map"),
    "evaluate malformed dataset.json": (lambda c: c.evaluate(_msd(c, '{"training": [')), r"dataset\.json"),
    "evaluate --limit 0": (lambda c: c.evaluate(_labelled(c), "--limit", "0"), "limit .*1 or more.*got 0"),
    "evaluate --data a file": (lambda c: c.evaluate(c.ct()), "not a data folder"),
    "evaluate -o an existing folder": (lambda c: c.evaluate(_labelled(c), "-o", (c.out.mkdir(), c.out)[1]),
                                       "metrics table .* is an existing folder"),
    # output folders
    "-o an existing file": (_out_is_a_file, "is an existing file"),
    "-o under a file": (_out_under_a_file, "is a file, not a folder"),
    "-o in a read-only folder": (_out_read_only, "permission denied"),
    "-o the input's folder, overwriting the input": (_out_overwrites_input, "would overwrite the input"),
    "-o the folder the input lies in as an output": (_input_among_the_outputs,
                                                      r"output .*labelmap\.nii\.gz would overwrite the input; choose"),
    "a batch whose case folder holds its input": (_batch_input_among_a_case_outputs,
                                                  r"labelmap.labelmap\.nii\.gz would overwrite the input"),
    "-o with a folder in the way": (_out_blocked_by_a_folder, "is in the way"),
}
NEEDS_A_NON_ROOT_USER = {"unreadable file", "-o in a read-only folder"}


def _access_as_the_owner(path, mode, *args, **kwargs) -> bool:
    """``os.access`` as a non-root owner sees it: root is granted everything, so as root the two
    permission cases read the owner's mode bits instead (the library asks ``os.access`` first)."""
    try:
        bits = (os.stat(path).st_mode >> 6) & 7
    except OSError:
        return False
    need = (4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0) | (1 if mode & os.X_OK else 0)
    return bits & need == need


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_input_gets_one_clear_line_and_exit_2(name, tmp_path, tiny_model, tiny_heatmap_model, ct_source,
                                                        monkeypatch, capfd):
    if name in NEEDS_A_NON_ROOT_USER and AS_ROOT:
        monkeypatch.setattr(os, "access", _access_as_the_owner)
    build, fragment = CASES[name]
    monkeypatch.chdir(tmp_path)  # a stray relative write (e.g. runs/NAME) shows up in the snapshot
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    case = Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)
    argv = build(case)
    watched = (tmp_path, tiny_model.parent, tiny_heatmap_model.parent)
    before = _snapshot(*watched)
    capfd.readouterr()
    status = main(argv)
    out, err = capfd.readouterr()
    assert_one_clear_line(name, status, out, err, fragment)
    after = _snapshot(*watched)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"{name}: files created, changed or removed: {changed}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu(tmp_path, tiny_model, tiny_heatmap_model, ct_source, capfd):
    case = Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)
    argv = case.segment(case.ct(), "--device", "cuda")
    before = _snapshot(tmp_path)
    capfd.readouterr()
    assert main(argv) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferseg: error: device 'cuda' was requested but"), lines
    assert "choose device 'cpu'" in lines[0]
    assert _snapshot(tmp_path) == before


def test_there_are_at_least_30_distinct_cases():
    assert len(CASES) + 1 >= 30  # + the CUDA case above
    assert len(set(fragment for _, fragment in CASES.values())) >= 30  # each names its own problem


# --- inputs that are odd but valid: they run, and the output lies on the input's grid -------------
ODD_VOLUMES = {
    "all-constant volume": (lambda: np.zeros((8, 32, 32), np.int16), "every voxel of the input .* is 0"),
    "one voxel thick": (lambda: ct_phantom(seed=4, shape=(1, 32, 32))[0].array, None),
}


@pytest.mark.parametrize("name", list(ODD_VOLUMES))
def test_odd_but_valid_volumes_segment_on_their_own_grid(name, tmp_path, tiny_model, capfd):
    make, warning = ODD_VOLUMES[name]
    source = write_image(make(), tmp_path / "odd.nii.gz", spacing_ijk=(0.8, 0.8, 2.5))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    capfd.readouterr()
    status = main(["segment", str(source), "-o", str(tmp_path / "out"), "--model", str(tiny_model), "--device", "cpu"])
    err = capfd.readouterr().err
    assert status == 0, err
    lines = err.splitlines()
    if warning:
        assert len(lines) == 1 and lines[0].startswith("transferseg: warning: ") and re.search(warning, lines[0]), err
    else:
        assert lines == [], err
    files = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))["files"]
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == sorted(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.nii.gz", "out"]  # no staging folder left
    reference, labels = sitk.ReadImage(str(source)), sitk.ReadImage(str(tmp_path / "out" / "labelmap.nii.gz"))
    assert labels.GetSize() == reference.GetSize() and labels.GetSpacing() == reference.GetSpacing()
    assert labels.GetOrigin() == reference.GetOrigin() and labels.GetDirection() == reference.GetDirection()
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


# --- a cancel mid-run: a real process, a real SIGINT ---------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_sigint_mid_run_exits_130_and_leaves_no_output(tmp_path, tiny_model):
    volume, _ = ct_phantom(seed=5, shape=(40, 128, 128))
    source = save_volume(volume, tmp_path / "ct.nii.gz")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "TransferSegLib.cli", "segment", str(source), "-o", str(out),
               "--model", str(tiny_model), "--device", "cpu", "--progress-lines"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        deadline = time.monotonic() + 240
        for line in process.stdout:  # the windows have started: the run is in the middle of its inference
            if line.startswith("PROGRESS ") and line.split()[2] == "inference" or time.monotonic() > deadline:
                break
        assert process.poll() is None, "the run ended before it could be cancelled"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferseg: ") and "cancelled" in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]  # not even a staging folder or temp file
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
