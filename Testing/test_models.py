"""Model cards and the registry: round trip, lookup, and every refusal (no file is ever unpickled)."""
from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from torch import nn

from TransferSegLib.models import find_model, list_models, load_model, save_model
from TransferSegLib.nets import ARCHITECTURES, register
from TransferSegLib.volume import TransferSegError
from TransferSegLib.weights import sha256_file


@register("test_tiny_seg")
class TinySeg(nn.Module):
    def __init__(self, in_channels=1, out_channels=3, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(),
                                  nn.Conv3d(width, out_channels, 1))

    def forward(self, x):
        return self.body(x)


def _card(name="tiny", width=4):
    return {
        "name": name, "version": "0.0.1", "task": "segmentation",
        "labels": [{"name": "liver", "label": 1, "color": [0.8, 0.4, 0.3]}],
        "architecture": {"name": "test_tiny_seg", "config": {"width": width}},
        "preprocessing": {"hu_window": [-200, 250]}, "patch_size": [8, 16, 16],
    }


@pytest.fixture
def saved(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "user"))
    torch.manual_seed(0)
    net = TinySeg(width=4)
    net.body[1].running_mean.fill_(0.25)  # buffers travel too
    card_path = save_model(net, _card(), tmp_path / "user")
    return net, card_path


def test_round_trip_by_name_and_by_path(saved):
    net, card_path = saved
    for ref in ("tiny", card_path, card_path.with_suffix(".safetensors"), card_path.parent):
        loaded = load_model(ref)
        assert loaded.name == "tiny" and not loaded.network.training
        for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.network.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    card = json.loads(card_path.read_text(encoding="utf-8"))
    assert card["weights"]["sha256"] == sha256_file(card_path.with_suffix(".safetensors"))
    assert [c["name"] for c in list_models()][0] == "tiny"


def test_checksum_mismatch_is_refused(saved):
    _, card_path = saved
    weights = card_path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(TransferSegError, match="checksum mismatch"):
        load_model(card_path)


def test_truncated_weights_are_refused(saved):
    _, card_path = saved
    weights = card_path.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TransferSegError, match="truncated"):
        load_model(card_path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_files_are_never_unpickled(tmp_path, monkeypatch, suffix):
    calls = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(TransferSegError, match="pickle"):
        load_model(path)
    assert calls == []


def test_pickle_disguised_as_safetensors_is_refused(saved, monkeypatch):
    _, card_path = saved
    weights = card_path.with_suffix(".safetensors")
    with zipfile.ZipFile(weights, "w") as z:  # what torch.save writes: a zip holding a pickle
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["weights"]["sha256"] = sha256_file(weights)
    card_path.write_text(json.dumps(card), encoding="utf-8")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(TransferSegError, match="pickle"):
        load_model(card_path)


def test_unknown_architecture_is_refused(saved):
    _, card_path = saved
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["architecture"]["name"] = "resnet9000"
    card_path.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(TransferSegError, match="unknown architecture 'resnet9000'"):
        load_model(card_path)
    assert "test_tiny_seg" in ARCHITECTURES


def test_weights_that_do_not_fit_are_refused(saved):
    _, card_path = saved
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["architecture"]["config"]["width"] = 6
    card_path.write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(TransferSegError, match="do not fit"):
        load_model(card_path)


def test_bad_cards_and_missing_models(saved, tmp_path):
    _, card_path = saved
    card_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(TransferSegError, match="not valid JSON"):
        load_model(card_path)
    card_path.write_text(json.dumps({"name": "tiny"}), encoding="utf-8")
    with pytest.raises(TransferSegError, match="lacks"):
        load_model(card_path)
    with pytest.raises(TransferSegError, match="no model named 'nope'"):
        find_model("nope")
    with pytest.raises(TransferSegError, match="no such model file"):
        find_model(tmp_path / "absent.safetensors")


def test_save_is_atomic_and_leaves_no_partial_files(tmp_path):
    save_model(TinySeg(), _card("a"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


@pytest.mark.parametrize("magic", [b"\x80", b"PK"])
def test_a_safetensors_header_length_that_looks_like_a_pickle_is_not_refused(tmp_path, magic):
    """The 8-byte header length may start with 0x80 (a pickle's first byte) or "PK" (a zip's)."""
    from safetensors.torch import save

    from TransferSegLib.weights import read_header, read_state_dict

    def header_length(pad):
        return int.from_bytes(save({"w": torch.arange(3.0)}, metadata={"pad": "x" * pad})[:8], "little")

    target = int.from_bytes(magic, "little") + (256 if magic == b"\x80" else 0)
    start = target - header_length(0)
    pad = next(n for n in range(max(0, start - 16), start + 16)
               if header_length(n) % 256 ** len(magic) == target % 256 ** len(magic))
    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"w": torch.arange(3.0)}, metadata={"pad": "x" * pad}))
    assert path.read_bytes()[:len(magic)] == magic
    assert read_header(path) == {"w": ("F32", (3,))}
    assert torch.equal(read_state_dict(path)["w"], torch.arange(3.0))
