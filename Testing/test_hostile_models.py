"""Hostile models, round 2: cards nested or padded far beyond a card, safetensors headers that a
correct sha256 vouches for but that lie about their tensors, and card values of the wrong type.

Each case must end like the cases of test_hostile_inputs.py: exit status 2, exactly one line on
stderr, ``transferseg: error: …``, that names the problem, no traceback, nothing in the case
folder created or changed.  A bad card must be refused when it is read: before any volume is
read and before the pipeline runs (both are replaced here by functions that fail the case).
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
from test_hostile_inputs import (Case, _signal_handlers_restored, _snapshot, assert_one_clear_line,  # noqa: F401
                                 ct_source)  # (fixtures)

from TransferSegLib import cards
from TransferSegLib.cli import main
from TransferSegLib.models import list_models, load_model, read_card, save_model
from TransferSegLib.nets import build_network
from TransferSegLib.volume import TransferSegError

SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "models"


# --- building hostile models ---------------------------------------------------------------------
def _model(c: Case, edit=None, heatmap=False, text: str | None = None) -> Path:
    """A copy of the tiny segmentation (or detection) model in the case folder: its card changed by
    ``edit``, or replaced by ``text``."""
    source = Path(c.heatmap_model if heatmap else c.model)
    folder = c.path("model")
    folder.mkdir()
    card = json.loads(source.read_text(encoding="utf-8"))
    shutil.copy(source.with_name(card["weights"]["file"]), folder / card["weights"]["file"])
    if edit is not None:
        edit(card)
    (folder / source.name).write_text(text if text is not None else json.dumps(card), encoding="utf-8")
    return folder / source.name


def _composed(c: Case, edit) -> Path:
    """The tiny network as the one component ("network") of a composed model (method single),
    saved properly, then its card changed by ``edit``: the weights and their sha256 stay valid."""
    card = json.loads(Path(c.model).read_text(encoding="utf-8"))
    spec = {k: card[k] for k in ("architecture", "preprocessing", "patch_size", "inference")}
    composed = {"name": "composed", "version": "0.0.1", "task": "segmentation", "labels": card["labels"],
                "method": {"name": "single", "config": {}}, "components": {"network": spec}}
    path = save_model({"network": build_network("unet3d", spec["architecture"]["config"])}, composed,
                      c.path("composed"))
    card = json.loads(path.read_text(encoding="utf-8"))
    edit(card)
    path.write_text(json.dumps(card), encoding="utf-8")
    return path


def _set(key, value, where=()):
    """An edit that sets ``card[*where][key] = value``."""
    def edit(card):
        target = card
        for part in where:
            target = target[part]
        target[key] = value
    return edit


def _split(raw: bytes) -> tuple:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _join(header: dict | bytes, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _by_offset(header: dict) -> list:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _forged(c: Case, change) -> Path:
    """The tiny model with its safetensors file rewritten by ``change(header, data) -> (header, data)``
    and the card's sha256 made to match it, so only the header check can refuse it."""
    header, data = _split(c.weights())
    forged = _join(*change(header, data))
    path = _model(c, _set("sha256", hashlib.sha256(forged).hexdigest(), ("weights",)))
    path.with_suffix(".safetensors").write_bytes(forged)
    return path


def _tensor(header: dict, n: int = 2) -> dict:
    """The n-th float tensor of more than one element, in file order."""
    keys = [k for k in _by_offset(header) if header[k]["dtype"] == "F32" and len(header[k]["shape"]) > 1]
    return header[keys[n]]


def _retype(header, data):
    _tensor(header)["dtype"] = "F16"  # half the bytes its range holds
    return header, data


def _reshape(header, data):
    _tensor(header)["shape"][0] += 1
    return header, data


def _overlap(header, data):
    entry = _tensor(header)
    entry["data_offsets"] = [entry["data_offsets"][0] - 4, entry["data_offsets"][1] - 4]
    return header, data


def _alias(header, data):
    """Two tensors of the same size sharing one byte range: the second one's own range left unused."""
    keys = _by_offset(header)
    first, second = next((a, b) for a, b in itertools.combinations(keys, 2)
                         if header[a]["dtype"] == header[b]["dtype"] and header[a]["shape"] == header[b]["shape"])
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    return header, data


def _gap(header, data):
    split = _tensor(header, 1)["data_offsets"][1]
    for key in _by_offset(header):
        if header[key]["data_offsets"][0] >= split:
            header[key]["data_offsets"] = [v + 64 for v in header[key]["data_offsets"]]
    return header, data[:split] + bytes(64) + data[split:]


def _offsets(value):
    def change(header, data):
        _tensor(header)["data_offsets"] = value(_tensor(header)["data_offsets"])
        return header, data
    return change


def _dtype(value):
    def change(header, data):
        _tensor(header)["dtype"] = value
        return header, data
    return change


def _shape(value):
    def change(header, data):
        _tensor(header)["shape"] = value
        return header, data
    return change


def _trailing(header, data):
    return header, data + bytes(16)


def _metadata(header, data):
    header["__metadata__"] = {"format": {"pt": True}}
    return header, data


def _no_offsets(header, data):
    del _tensor(header)["data_offsets"]
    return header, data


def _deep_header(header, data):
    deep = b"[" * 200_000 + b"]" * 200_000
    header = b'{"__metadata__": {"format": "pt"}, "x": {"dtype": "F32", "shape": ' + deep + b', "data_offsets": [0, 0]}}'
    return header, b""


def _deep_card(c: Case, depth: int = 200_000, heatmap=False) -> Path:
    """A small card file (a few hundred KB) that is lists in lists ``depth`` deep inside "training"."""
    card = json.loads(Path(c.heatmap_model if heatmap else c.model).read_text(encoding="utf-8"))
    text = json.dumps(dict(card, training="DEEP"))
    return _model(c, heatmap=heatmap, text=text.replace('"DEEP"', "[" * depth + "]" * depth))


def _nested(depth: int) -> list:
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _huge_card(c: Case) -> Path:
    """A 50 MB card nested 25 million deep."""
    path = _model(c, text="")
    with open(path, "w", encoding="utf-8") as f:
        for char in "[]":
            f.write(char * 25_000_000)
    return path


def _padded_card(c: Case) -> Path:
    """A valid card after 17 MiB of blank space: refused for its size, before it is parsed."""
    card = json.loads(Path(c.model).read_text(encoding="utf-8"))
    return _model(c, text=" " * (17 * 2**20) + json.dumps(card))


# --- the cases -----------------------------------------------------------------------------------
# name -> (argv built in the case folder, the words of the message that name the problem)
CARD_FILES = {
    "a 50 MB card nested 25 million deep": (lambda c: c.segment(c.ct(), model=_huge_card(c)),
                                            r"model card is \d+ MiB; a card is a few KB"),
    "a valid card after 17 MiB of blanks": (lambda c: c.segment(c.ct(), model=_padded_card(c)),
                                            r"model card is 17 MiB"),
    "a small card nested 200000 deep": (lambda c: c.segment(c.ct(), model=_deep_card(c)), "nested too deeply"),
    "a detector card nested 50000 deep": (lambda c: c.segment(c.ct(), command="detect",
                                                              model=_deep_card(c, 50_000, heatmap=True)),
                                          "nested too deeply"),
    # deep enough to break copy.deepcopy when the model loads, shallow enough for json.loads
    "an architecture config nested 500 deep": (lambda c: c.segment(c.ct(), model=_model(c, _set(
        "extra", _nested(500), ("architecture", "config")))), "nests objects and lists more than 64 levels deep"),
}

WEIGHT_HEADERS = {
    "header nested 200000 deep": (_deep_header, r"safetensors file \(its header is nested too deeply\)"),
    "dtype that does not fit its byte range": (_retype, r"is F16 of shape \[\d+(, \d+)+\] \(\d+ bytes\), but its "
                                                        r"data_offsets \[\d+, \d+\] span \d+ bytes"),
    "shape that does not fit its byte range": (_reshape, r"is F32 of shape .* but its data_offsets"),
    "overlapping byte ranges": (_overlap, r"tensor '.*' at bytes \d+–\d+ overlaps tensor '.*'"),
    "two tensors sharing one byte range": (_alias, r"overlaps tensor"),
    "a gap between two tensors": (_gap, r"leaves 64 unused bytes after tensor '.*'"),
    "negative data_offsets": (_offsets(lambda o: [-4, o[1] - o[0] - 4]), r"data_offsets \[-4, .*0 ≤ begin ≤ end"),
    "reversed data_offsets": (_offsets(lambda o: o[::-1]), r"data_offsets \[\d+, \d+\]; they must be \[begin, end\]"),
    "data_offsets not whole numbers": (_offsets(lambda o: [float(v) for v in o]), r"data_offsets \[\d+\.0, "),
    "data_offsets as text": (_offsets(lambda o: [str(v) for v in o]), r'data_offsets \["\d+", '),
    "unknown dtype": (_dtype("F33"), r"unknown dtype 'F33'"),
    "dtype a number": (_dtype(4), r"unknown dtype '4'"),
    "negative dimension": (_shape([-1, 4, 3, 3, 3]), r"has shape \[-1, 4, 3, 3, 3\]; a shape is a list"),
    "fractional dimension": (_shape([2.5, 4, 3, 3, 3]), r"has shape \[2\.5, "),
    "shape as text": (_shape("16x8"), r'has shape "16x8"'),
    "bytes after the last tensor": (_trailing, r"last 16 bytes of the data belong to no tensor"),
    "nested __metadata__": (_metadata, r"__metadata__ must map names to strings"),
    "an entry without data_offsets": (_no_offsets, r"needs dtype, shape and data_offsets"),
}

CARD_VALUES = {
    # spacings
    "trained_spacing_mm a string": (_set("trained_spacing_mm", "1 mm"), r"trained_spacing_mm must be \{\"min\""),
    "trained_spacing_mm of two axes": (_set("trained_spacing_mm", {"min": [1, 1], "max": [2, 2]}),
                                       r"trained_spacing_mm must be .*got \{\"min\": \[1, 1\]"),
    "trained_spacing_mm min > max": (_set("trained_spacing_mm", {"min": [1, 2, 1], "max": [2, 1, 2]}),
                                     r"trained_spacing_mm must be .*min ≤ max"),
    "trained_spacing_mm without max": (_set("trained_spacing_mm", {"min": [1, 1, 1]}), "trained_spacing_mm must be"),
    "working_spacing_mm with a zero": (_set("working_spacing_mm", [0, 1, 1]),
                                       r"working_spacing_mm must be null or 3 positive numbers .*got \[0, 1, 1\]"),
    "working_spacing_mm with NaN": (_set("working_spacing_mm", [float("nan"), 1, 1]),
                                    r"working_spacing_mm must be .*got \[NaN, 1, 1\]"),
    "working_spacing_mm a string": (_set("working_spacing_mm", "2mm"), r'working_spacing_mm must be .*got "2mm"'),
    "expected_spacing_mm of four axes": (_set("expected_spacing_mm", [1, 1, 1, 1]), "expected_spacing_mm must be"),
    "expected_spacing_mm negative": (_set("expected_spacing_mm", [3, -0.8, 0.8]), "expected_spacing_mm must be"),
    # orientation, patch, view
    "working_orientation LPX": (_set("working_orientation", "LPX"), r"working_orientation must be .*got \"LPX\""),
    "working_orientation with an axis twice": (_set("working_orientation", "LRS"), "working_orientation must be"),
    "working_orientation a number": (_set("working_orientation", 3), "working_orientation must be"),
    "patch_size of two axes": (_set("patch_size", [8, 32]), r"patch_size must be 3 positive whole numbers"),
    "patch_size with a zero": (_set("patch_size", [8, 0, 32]), r"patch_size must be .*got \[8, 0, 32\]"),
    "patch_size of fractions": (_set("patch_size", [8.5, 32, 32]), "patch_size must be"),
    "patch_size a string": (_set("patch_size", "8,32,32"), "patch_size must be"),
    "view oblique": (_set("view", "oblique"), r"view must be null or one of axial, coronal, sagittal"),
    # preprocessing and inference
    "hu_window reversed": (_set("hu_window", [250, -200], ("preprocessing",)), r"preprocessing.hu_window must be"),
    "unknown preprocessing key": (_set("window", [0, 1], ("preprocessing",)),
                                  r"preprocessing.window is not one of the preprocessing settings"),
    "preprocessing a string": (_set("preprocessing", "ct"), r"preprocessing must be an object"),
    "inference overlap 1": (_set("overlap", 1.0, ("inference",)), r"inference.overlap must be a fraction in \[0, 1\)"),
    "inference activation relu": (_set("activation", "relu", ("inference",)), r"inference.activation must be"),
    "inference batch_size 0": (_set("batch_size", 0, ("inference",)), r"inference.batch_size must be a whole number"),
    "inference batch_size true": (_set("batch_size", True, ("inference",)), r"inference.batch_size must be"),
    "unknown inference key": (_set("overlapp", 0.5, ("inference",)),
                              r"inference.overlapp is not one of the inference settings"),
    "inference patch_size of two axes": (_set("patch_size", [8, 8], ("inference",)), r"inference.patch_size must be"),
    # labels
    "duplicate label values": (lambda card: card["labels"][1].update(label=1), r"label value 1 is given twice"),
    "duplicate label names": (lambda card: card["labels"][1].update(name="liver"),
                              r"label name 'liver' is given twice"),
    "label values with a gap": (lambda card: card["labels"][1].update(label=3),
                                r"label values must be 1…n.*\[1, 3\]"),
    "label 0": (lambda card: card["labels"][0].update(label=0), r"labels\[0\].label must be a whole number 1…255"),
    "label without a name": (lambda card: card["labels"][0].pop("name"), r"labels\[0\] lacks name"),
    "label colour out of range": (lambda card: card["labels"][0].update(color=[0.5, 0.5, 2]),
                                  r"labels\[0\].color must be \[r, g, b\] in 0…1"),
    "label terminology without a type": (lambda card: card["labels"][0].update(terminology={"category": ["SCT"]}),
                                         r"labels\[0\].terminology must be"),
    # the model's own keys
    "name a number": (_set("name", 42), r"name must be a non-empty string"),
    "version a number": (_set("version", 1.0), r"version must be a string"),
    "metrics a list": (_set("metrics", [0.9]), r"metrics must be an object"),
    "evaluation regions of names": (_set("regions", {"liver": ["liver"]}, ("evaluation",)),
                                    r"evaluation.regions must be"),
    "postprocessing of a label 300": (_set("postprocessing", {"fill_holes": [300]}), r"postprocessing.fill_holes"),
    "postprocessing keyed by a superscript": (_set("postprocessing", {"inside": {"²": [1, 2]}}),
                                              r"postprocessing.inside must look like"),
}

DETECTOR_VALUES = {
    "unknown peaks key": (_set("treshold", 0.2, ("peaks",)), r"peaks.treshold is not one of the peaks settings "
                                                            r"\(threshold, min_distance, max_peaks\)"),
    "peaks threshold a string": (_set("threshold", "0.2", ("peaks",)), r'peaks.threshold must be a number.*got "0.2"'),
    "peaks threshold infinite": (_set("threshold", float("inf"), ("peaks",)), r"peaks.threshold must be a number"),
    "peaks min_distance negative": (_set("min_distance", [2, -1, 3], ("peaks",)), r"peaks.min_distance must be"),
    "peaks min_distance of two axes": (_set("min_distance", [2, 6], ("peaks",)), r"peaks.min_distance must be"),
    "peaks max_peaks 0": (_set("max_peaks", 0, ("peaks",)), r"peaks.max_peaks must be a whole number ≥ 1"),
    "peaks a list": (_set("peaks", [0.2, 2, 5]), r"peaks must be an object"),
    "detector labels twice": (lambda card: card["labels"].append(dict(card["labels"][0])),
                              r"label value 1 is given twice"),
}

COMPOSED_VALUES = {
    "component working_spacing_mm negative": (_set("working_spacing_mm", [1, -1, 1], ("components", "network")),
                                              r"components.network.working_spacing_mm must be"),
    "component inference unknown key": (_set("blending", "gaussian", ("components", "network", "inference")),
                                        r"components.network.inference.blending is not one of the inference"),
    "component patch_size a number": (_set("patch_size", 32, ("components", "network")),
                                      r"components.network.patch_size must be"),
    "composed trained_spacing_mm a string": (_set("trained_spacing_mm", "fine"), r"trained_spacing_mm must be"),
    "multiview fusion unknown": (_set("method", {"name": "multiview", "config": {"fusion": "average"}}),
                                 r"method.config.fusion must be \"vfn\", \"vfn-noimage\", \"majority\", \"staple\""),
    "multiview vfn without its network": (_set("method", {"name": "multiview", "config": {"fusion": "vfn"}}),
                                          r"fusion 'vfn' needs the component 'fusion'"),
    "multiview stride 0": (_set("method", {"name": "multiview", "config": {"fusion": "majority", "stride": 0}}),
                           r"method.config.stride must be a whole number ≥ 1"),
    "cascade unknown setting": (_set("method", {"name": "cascade", "config": {"threshold": 0.5}}),
                                r"method.config.threshold is not a cascade setting"),
    "cascade thresholds one short": (_set("method", {"name": "cascade", "config": {"thresholds": [0.5]}}),
                                     r"thresholds must give one probability per label \(2\)"),
    "cascade windows that do not tile": (_set("method", {"name": "cascade", "config": {"slices": 4, "stride": 2}}),
                                         r"need stride ≤ slices − 2·margin"),
}

CASES = {
    **{name: (build, fragment, True) for name, (build, fragment) in CARD_FILES.items()},
    **{f"weights: {name}": (lambda c, change=change: c.segment(c.ct(), model=_forged(c, change)), fragment, False)
       for name, (change, fragment) in WEIGHT_HEADERS.items()},
    **{f"card: {name}": (lambda c, edit=edit: c.segment(c.ct(), model=_model(c, edit)), fragment, True)
       for name, (edit, fragment) in CARD_VALUES.items()},
    **{f"detector card: {name}": (lambda c, edit=edit: c.segment(c.ct(), command="detect",
                                                                 model=_model(c, edit, heatmap=True)), fragment, True)
       for name, (edit, fragment) in DETECTOR_VALUES.items()},
    **{f"composed card: {name}": (lambda c, edit=edit: c.segment(c.ct(), model=_composed(c, edit)), fragment, True)
       for name, (edit, fragment) in COMPOSED_VALUES.items()},
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_model_gets_one_clear_line_and_exit_2(name, tmp_path, tiny_model, tiny_heatmap_model, ct_source,
                                                        monkeypatch, capfd):
    build, fragment, refused_from_the_card = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    case = Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)
    argv = build(case)
    if refused_from_the_card:  # before the volume is read, and long before any inference
        def too_late(*args, **kwargs):
            raise AssertionError(f"{name}: the bad card was not refused before the volume was read / the run began")

        monkeypatch.setattr("TransferSegLib.io.load_volume", too_late)
        monkeypatch.setattr("TransferSegLib.pipeline.run", too_late)
    watched = (tmp_path, tiny_model.parent, tiny_heatmap_model.parent)
    before = _snapshot(*watched)
    capfd.readouterr()
    status = main(argv)
    out, err = capfd.readouterr()
    lines = assert_one_clear_line(name, status, out, err, fragment)
    assert len(lines[0]) < 600, f"{name}: the line is {len(lines[0])} characters long"
    changed = sorted(set(before.items()) ^ set(_snapshot(*watched).items()))
    assert not changed, f"{name}: files created, changed or removed: {changed}"


def test_the_forged_weights_pass_their_checksum(tmp_path, tiny_model, tiny_heatmap_model, ct_source):
    """Each forged file is vouched for by its card: without the header check it would reach safetensors."""
    from TransferSegLib.weights import sha256_file

    for n, (name, (change, _)) in enumerate(WEIGHT_HEADERS.items()):
        root = tmp_path / str(n)
        root.mkdir()
        card_path = _forged(Case(root, tiny_model, ct_source, tiny_heatmap_model), change)
        card = json.loads(card_path.read_text(encoding="utf-8"))
        assert sha256_file(card_path.with_suffix(".safetensors")) == card["weights"]["sha256"], name
        with pytest.raises(TransferSegError):
            load_model(card_path)


def test_there_are_enough_cases_of_each_kind():
    assert len(CARD_FILES) + 1 >= 3  # + the deep safetensors header
    assert len(WEIGHT_HEADERS) >= 5
    assert len(CARD_VALUES) + len(DETECTOR_VALUES) + len(COMPOSED_VALUES) >= 6


# --- what must still pass ------------------------------------------------------------------------
def test_every_shipped_card_passes_and_loads():
    paths = sorted(SHIPPED.glob("*.json"))
    assert len(paths) >= 6
    for path in paths:
        read_card(path)
    listed = {Path(card["_path"]).resolve() for card in list_models()}
    assert {p.resolve() for p in paths} <= listed  # list_models skips a card that fails its check


ODD_BUT_VALID = {
    "orientation in lower case": _set("working_orientation", "lps"),
    "null spacings": lambda card: card.update(working_spacing_mm=None, expected_spacing_mm=None,
                                              trained_spacing_mm=None, working_orientation=None),
    "equal min and max spacing": _set("trained_spacing_mm", {"min": [1, 0.5, 0.5], "max": [1, 0.5, 0.5]}),
    "inference patch_size null": _set("patch_size", None, ("inference",)),
    "a terminology string": lambda card: card["labels"][0].update(
        terminology="Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                    "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"),
    "labels listed out of order": lambda card: card["labels"].reverse(),
    "every inference setting": _set("inference", {"overlap": 0, "blend": "constant", "batch_size": 1,
                                                  "activation": "sigmoid", "patch_size": [8, 32, 32]}),
}


@pytest.mark.parametrize("name", list(ODD_BUT_VALID))
def test_odd_but_valid_cards_are_read(name, tmp_path, tiny_model, tiny_heatmap_model, ct_source):
    case = Case(tmp_path, tiny_model, ct_source, tiny_heatmap_model)
    read_card(_model(case, ODD_BUT_VALID[name]))


def test_detector_peaks_that_find_peaks_takes_are_read(tmp_path, tiny_model, tiny_heatmap_model, ct_source):
    for n, peaks in enumerate(({"min_distance": 3}, {"threshold": -1, "max_peaks": 1}, None, {})):
        root = tmp_path / str(n)
        root.mkdir()
        read_card(_model(Case(root, tiny_model, ct_source, tiny_heatmap_model), _set("peaks", peaks), heatmap=True))


# --- the card checks know what the code they guard takes ------------------------------------------
def test_the_orientation_check_agrees_with_to_orientation():
    import numpy as np

    from TransferSegLib.resample import to_orientation
    from TransferSegLib.volume import Volume

    volume = Volume(np.zeros((2, 3, 4), np.float32))
    for letters in itertools.product("RLAPSIX", repeat=3):
        code = "".join(letters)
        try:
            to_orientation(volume, code)
            works = True
        except TransferSegError:
            works = False
        assert cards._orientation(code) == works, code


def test_the_card_checks_name_the_choices_the_code_takes():
    from TransferSegLib import inference
    from TransferSegLib.heatmaps import find_peaks
    from TransferSegLib.methods import cascade, multiview

    peaks = set(inspect.signature(find_peaks).parameters) - {"heatmap", "volume"}
    assert set(cards._SECTIONS["peaks"][0]) == peaks
    assert cards.ACTIVATIONS == inference.ACTIVATIONS and cards.BLENDS == inference.BLENDS
    assert cards.FUSIONS == multiview.FUSIONS
    assert set(cards._METHODS["cascade"]) == set(cascade.DEFAULTS)
