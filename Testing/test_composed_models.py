"""Composed models: separately trained networks assembled into one model (method + components,
one safetensors file under prefixed keys, one sha256), and the old one-network cards still
read as method ``single`` with one component, ``network``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import LIVER_TUMOR_SEGMENTS, randomize_bn
from TransferSegLib.models import compose_models, load_model, save_model
from TransferSegLib.nets import build_network
from TransferSegLib.volume import TransferSegError
from TransferSegLib.weights import read_header, read_state_dict, save_state_dict, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "Resources" / "models"
CORONAL_CONFIG = {"in_channels": 1, "out_channels": 3, "base_channels": 2, "levels": 3, "norm": "batch"}


def _card(name, config, task="segmentation", **extra):
    return {"name": name, "version": "0.0.2", "task": task, "labels": LIVER_TUMOR_SEGMENTS,
            "architecture": {"name": "unet3d", "config": config}, "preprocessing": {"hu_window": [-100, 200]},
            "patch_size": [8, 16, 16], "expected_spacing_mm": [2.0, 1.0, 1.0], "inference": {"overlap": 0.5},
            **extra}


@pytest.fixture
def sources(tiny_model, tmp_path, monkeypatch):
    """Two separately saved one-network models with different configs: the suite's tiny 3D U-Net
    (axial) and a narrower, deeper one (coronal), both with BatchNorm buffers to carry."""
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "user"))
    torch.manual_seed(3)
    coronal = randomize_bn(build_network("unet3d", CORONAL_CONFIG), seed=4)
    coronal_card = save_model(coronal, _card("tiny-coronal", CORONAL_CONFIG), tmp_path / "sources")
    return {"axial": str(tiny_model), "coronal": str(coronal_card)}


def _compose(sources, folder, **options):
    options = {"name": "tiny-multiview", "method": "multiview", "method_config": {"fusion": "majority"}, **options}
    return compose_models(sources, folder, **options)


def _rewrite_weights(card_path, state):
    """Replace a model's weights and fix its card's sha256, so only the key check can refuse it."""
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["weights"]["sha256"] = save_state_dict(state, card_path.with_name(card["weights"]["file"]))
    card_path.write_text(json.dumps(card), encoding="utf-8")


def test_compose_through_the_cli_writes_one_file_with_prefixed_keys(sources, tmp_path):
    out = tmp_path / "composed"
    done = subprocess.run(
        [sys.executable, "-m", "TransferSegLib.cli", "compose", "-o", str(out), "--name", "tiny-multiview",
         "--method", "multiview", "--component", f"axial={sources['axial']}",
         "--component", f"coronal={sources['coronal']}", "--method-config", '{"fusion": "majority"}'],
        capture_output=True, text=True, encoding="utf-8", cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tiny-multiview.json", "tiny-multiview.safetensors"]
    weights = out / "tiny-multiview.safetensors"
    assert str(weights) in done.stdout and "axial: unet3d from tiny-unet3d" in done.stdout
    assert oct(weights.stat().st_mode & 0o777) == "0o644"

    card = json.loads((out / "tiny-multiview.json").read_text(encoding="utf-8"))
    assert card["method"] == {"name": "multiview", "config": {"fusion": "majority"}}
    assert set(card["components"]) == {"axial", "coronal"} and "architecture" not in card
    assert card["weights"]["sha256"] == sha256_file(weights) and card["weights"]["sha256"] in done.stdout
    assert card["components"]["coronal"]["architecture"]["config"] == CORONAL_CONFIG
    assert card["components"]["coronal"]["expected_spacing_mm"] == [2.0, 1.0, 1.0]
    assert (card["components"]["axial"]["view"], card["components"]["coronal"]["view"]) == ("axial", "coronal")
    assert card["labels"] == LIVER_TUMOR_SEGMENTS and card["task"] == "segmentation"
    assert card["evaluation"] == {"regions": {"liver": [1, 2], "liver tumor": [2]}}  # from the labels' source
    for component, source in sources.items():
        source_card = json.loads(Path(source).read_text(encoding="utf-8"))
        assert card["training"]["composed_from"][component]["sha256"] == source_card["weights"]["sha256"]

    header = read_header(weights)
    for component, source in sources.items():
        own = read_header(Path(source).with_suffix(".safetensors"))
        assert {k for k in header if k.startswith(component + ".")} == {f"{component}.{k}" for k in own}
        assert all(header[f"{component}.{k}"] == v for k, v in own.items())
    assert len(header) == sum(len(read_header(Path(s).with_suffix(".safetensors"))) for s in sources.values())

    listed = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "models"], capture_output=True, text=True, encoding="utf-8",
                            cwd=ROOT, env={**os.environ, "TRANSFERSEG_MODELS": str(out)}, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "tiny-multiview" in listed.stdout and "multiview (axial: unet3d patch [8, 32, 32]" in listed.stdout

    # the function and the command write the same model (not byte for byte: safetensors writes
    # its metadata in a per-process hash order)
    python = _compose(sources, tmp_path / "python")
    assert read_header(python.with_suffix(".safetensors")) == header
    assert {k: v for k, v in json.loads(python.read_text(encoding="utf-8")).items() if k != "weights"} == \
        {k: v for k, v in card.items() if k != "weights"}
    ours, theirs = read_state_dict(python.with_suffix(".safetensors")), read_state_dict(weights)
    assert all(torch.equal(ours[k], theirs[k]) for k in header)


def test_a_composed_model_loads_each_component_exactly_as_its_source(sources, tmp_path):
    card_path = _compose(sources, tmp_path / "composed")
    loaded = load_model(card_path)
    assert set(loaded.components) == {"axial", "coronal"}
    assert loaded.method == {"name": "multiview", "config": {"fusion": "majority"}}
    assert loaded.card == json.loads(card_path.read_text(encoding="utf-8"))
    for name, source in sources.items():
        component = loaded.components[name]
        assert component.name == name and component.spec == loaded.card["components"][name]
        assert not component.network.training
        expected = load_model(source).network.state_dict()
        got = component.network.state_dict()
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert loaded.components["axial"].network.config["base_channels"] == 4
    assert loaded.components["coronal"].network.config["base_channels"] == 2
    with pytest.raises(TransferSegError, match="composed model .*axial, coronal"):
        loaded.network


def test_a_tampered_composed_model_is_refused(sources, tmp_path):
    card_path = _compose(sources, tmp_path / "composed")
    weights = card_path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(TransferSegError, match="checksum mismatch"):
        load_model(card_path)


def test_missing_and_extra_prefixed_keys_are_refused(sources, tmp_path):
    card_path = _compose(sources, tmp_path / "composed")
    state = read_state_dict(card_path.with_suffix(".safetensors"))
    dropped = sorted(k for k in state if k.startswith("coronal."))[0]

    _rewrite_weights(card_path, {k: v for k, v in state.items() if k != dropped})
    with pytest.raises(TransferSegError, match=f"component 'coronal'.*missing {dropped}"):
        load_model(card_path)

    _rewrite_weights(card_path, {**state, "sagittal.conv.weight": torch.zeros(2)})
    with pytest.raises(TransferSegError, match=r"1 tensor\(s\) belong to no component .*sagittal\.conv\.weight"):
        load_model(card_path)

    _rewrite_weights(card_path, {**state, "axial.extra.weight": torch.zeros(2)})
    with pytest.raises(TransferSegError, match="component 'axial'.*unexpected axial.extra.weight"):
        load_model(card_path)

    _rewrite_weights(card_path, {k.replace("axial.", "", 1): v for k, v in state.items()})  # prefix lost
    with pytest.raises(TransferSegError, match="belong to no component"):
        load_model(card_path)

    _rewrite_weights(card_path, state)  # the same tensors again: loads
    assert set(load_model(card_path).components) == {"axial", "coronal"}


@pytest.mark.parametrize("form", ["composed", "single"])
def test_an_absurd_config_is_refused_before_anything_is_allocated(sources, tmp_path, form):
    if form == "composed":
        card_path = _compose(sources, tmp_path / "composed")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        arch = card["components"]["axial"]["architecture"]
        key = "axial.encoder.0.0.weight"
    else:
        card_path = Path(sources["axial"])
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card_path = tmp_path / "tiny-unet3d.json"
        (tmp_path / "tiny-unet3d.safetensors").write_bytes(Path(sources["axial"]).with_suffix(".safetensors")
                                                            .read_bytes())
        arch = card["architecture"]
        key = "encoder.0.0.weight"
    arch["config"]["base_channels"] = 200000  # a 3D U-Net of ~3·10¹³ parameters: 150 TB in float32
    card_path.write_text(json.dumps(card), encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(TransferSegError) as refused:
        load_model(card_path)
    assert time.perf_counter() - start < 5
    message = str(refused.value)
    assert "do not fit" in message and f"{key} is (4, 1, 3, 3, 3) in the file but the config needs " \
                                      "(200000, 1, 3, 3, 3)" in message, message


def test_old_form_cards_load_as_one_component_named_network(tiny_model, tmp_path):
    header = read_header(tiny_model.with_suffix(".safetensors"))
    assert header and not any(k.startswith("network.") for k in header)  # the old form has no prefix
    loaded = load_model(tiny_model)
    card = json.loads(tiny_model.read_text(encoding="utf-8"))
    assert set(loaded.components) == {"network"} and loaded.method == {"name": "single", "config": {}}
    assert loaded.components["network"].network is loaded.network
    assert loaded.components["network"].spec == {k: card[k] for k in ("architecture", "preprocessing",
                                                                       "patch_size", "inference")}
    assert set(loaded.network.state_dict()) == set(header)


@pytest.mark.parametrize("name", ["ct-liver-tumor-unet3d", "ct-liver-tumor-ahnet"])
def test_shipped_models_load_unchanged_as_single(name):
    card_path = SHIPPED / f"{name}.json"
    weights = SHIPPED / f"{name}.safetensors"
    before = (card_path.read_bytes(), weights.stat().st_mtime_ns)
    loaded = load_model(card_path)
    assert set(loaded.components) == {"network"} and loaded.method["name"] == "single"
    spec = loaded.components["network"].spec
    assert spec["architecture"] == loaded.card["architecture"] and spec["patch_size"] == loaded.card["patch_size"]
    assert spec["expected_spacing_mm"] == loaded.card["expected_spacing_mm"]
    assert sha256_file(weights) == loaded.card["weights"]["sha256"]
    assert (card_path.read_bytes(), weights.stat().st_mtime_ns) == before


def test_compose_refusals(sources, tmp_path):
    torch.manual_seed(5)
    config = {"in_channels": 1, "out_channels": 1, "base_channels": 2, "levels": 2}
    heatmap = save_model(build_network("unet3d", config), _card("tiny-heatmap", config, task="heatmap"),
                         tmp_path / "heat")
    with pytest.raises(TransferSegError, match="disagree on the task .*axial: segmentation, coronal: heatmap"):
        _compose({"axial": sources["axial"], "coronal": str(heatmap)}, tmp_path / "x")
    composed = _compose(sources, tmp_path / "composed")
    with pytest.raises(TransferSegError, match="itself composed"):
        _compose({"axial": str(composed)}, tmp_path / "x", name="again")
    with pytest.raises(TransferSegError, match="component name 'ax.ial'"):
        _compose({"ax.ial": sources["axial"]}, tmp_path / "x")
    with pytest.raises(TransferSegError, match="labels from 'fusion': no such component"):
        _compose(sources, tmp_path / "x", labels_from="fusion")
    assert not (tmp_path / "x").exists()  # nothing written by a refused composition

    done = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "compose", "-o", str(tmp_path / "x"),
                           "--name", "bad", "--method", "multiview", "--component", f"axial={sources['axial']}",
                           "--component", f"coronal={heatmap}"],
                          capture_output=True, text=True, encoding="utf-8", cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 2 and "disagree on the task" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_save_model_matches_networks_to_the_cards_form(tmp_path):
    net = build_network("unet3d", CORONAL_CONFIG)
    composed = {k: v for k, v in _card("c", CORONAL_CONFIG).items() if k not in ("architecture", "patch_size")}
    composed.update(method={"name": "cascade"}, components={"coarse": {"architecture": {"name": "unet3d",
                                                                                        "config": CORONAL_CONFIG}}})
    with pytest.raises(TransferSegError, match="take.* a dict of networks"):
        save_model(net, composed, tmp_path)
    with pytest.raises(TransferSegError, match="components are exactly fine"):
        save_model({"fine": net}, composed, tmp_path)
    with pytest.raises(TransferSegError, match="composed card"):
        save_model({"coarse": net}, _card("c", CORONAL_CONFIG), tmp_path)
    with pytest.raises(TransferSegError, match="lacks components"):
        save_model({"coarse": net}, {k: v for k, v in composed.items() if k != "components"}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # a refused card writes nothing
    card_path = save_model({"coarse": net}, composed, tmp_path)
    loaded = load_model(card_path)
    assert loaded.method == {"name": "cascade", "config": {}} and set(loaded.components) == {"coarse"}
    assert all(k.startswith("coarse.") for k in read_header(card_path.with_suffix(".safetensors")))
