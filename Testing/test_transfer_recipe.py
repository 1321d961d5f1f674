"""The 2D → 3D transfer recipe: a 2D network trained on slices, then the 3D network it becomes —
an ACS network converted by ``nets.convert`` (ACS sec. 3.2) or an AH-Net whose encoder is the
MC-GCN's (AH-Net sec. 3.2) — shipped as one fp16 model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from TransferSegLib.models import load_model
from TransferSegLib.nets import build_network
from TransferSegLib.nets.convert import convert
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.pipeline import run
from TransferSegLib.training import validate_config
from TransferSegLib.training.recipes import run_recipe, validate_recipe
from TransferSegLib.training.networks import network_from_config
from TransferSegLib.volume import TransferSegError

CONFIGS = Path(__file__).resolve().parents[1] / "Resources" / "configs"
UNET2D = {"in_channels": 1, "out_channels": 3, "base_channels": 6, "levels": 3, "norm": "batch"}


def tiny(name: str, **changes) -> dict:
    """A shipped transfer recipe shrunk to seconds: 3 small phantoms, tiny networks, 2 steps per stage."""
    config = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    config["data"] = {"phantom": "ct", "count": 3, "seed": 1000, "options": {"shape": [24, 64, 64]}}
    for part in ("source", "target"):
        for stage in config[part]["stages"]:
            stage["steps"] = 2
        config[part]["validation"] = {"fraction": 0.0}
    config["threads"] = 1
    config.update(changes)
    return config


def tiny_acs(**changes) -> dict:
    config = tiny("ct-liver-tumor-acs", **changes)
    config["source"]["architecture"]["config"] = dict(UNET2D, slice_batch=8)
    config["source"]["patch_size"] = [4, 32, 32]
    config["target"]["architecture"]["config"]["config"] = dict(UNET2D)
    config["target"]["patch_size"] = [8, 32, 32]
    config["target"]["inference"]["patch_size"] = [40, 224, 224]
    return config


def test_converted_architecture_is_the_2d_network_converted():
    torch.manual_seed(0)
    net = build_network("converted", {"source": "unet2d", "config": UNET2D, "to": "acs"})
    reference = convert(build_network("unet2d", UNET2D), "acs")
    assert type(net) is type(reference)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert net.config == {"source": "unet2d", "config": UNET2D, "to": "acs"}
    assert net(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 3, 8, 16, 16)
    with pytest.raises(TransferSegError, match="unknown conversion"):
        build_network("converted", {"source": "unet2d", "config": UNET2D, "to": "4d"})
    with pytest.raises(TransferSegError, match="source must name a 2D architecture"):
        build_network("converted", {"source": "converted"})


@pytest.fixture(scope="module")
def acs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("acs")
    config = tiny_acs()
    return config, out, run_recipe(config, out)


def _target_config(config: dict, out: Path, init: dict) -> dict:
    target = json.loads((out / "recipe.json").read_text(encoding="utf-8"))["target"]
    return validate_config(dict(target, name="t", labels=config["labels"], data=config["data"], init_weights=init))


def test_convert_from_starts_the_3d_network_at_the_converted_2d_weights(acs_run):
    config, out, _ = acs_run
    model_2d = out / "source" / "model" / "ct-liver-tumor-acs-source.json"
    network, report = network_from_config(_target_config(config, out, {"convert_from": str(model_2d)}), "cpu")
    unet2d = load_model(model_2d, device="cpu").network.net
    assert report["loaded"] == len(network.state_dict()) and report["converted_to"] == "acs"
    # independent of the converter: every 3×3 ACS kernel holds the trained 2D kernel as it is, BatchNorm
    # statistics included, and a 1×1 conv became 1×1×1
    for key, value in unet2d.state_dict().items():
        mine = network.state_dict()[key]
        assert torch.equal(mine.reshape(value.shape), value), key
    pointwise = [k for k, v in unet2d.state_dict().items() if v.ndim == 4 and v.shape[-2:] == (1, 1)]
    assert pointwise and all(network.state_dict()[k].shape[-3:] == (1, 1, 1) for k in pointwise)
    wrong = dict(UNET2D, base_channels=8)
    sub = _target_config(config, out, {"convert_from": str(model_2d)})
    sub["architecture"] = {"name": "converted", "config": {"source": "unet2d", "config": wrong, "to": "acs"}}
    with pytest.raises(TransferSegError, match="base_channels is 8 but the 2D network"):
        network_from_config(sub, "cpu")
    with pytest.raises(TransferSegError, match="converts a 2D model into a 'converted' architecture"):
        validate_config(dict(sub, architecture={"name": "unet3d", "config": {}}))


def test_acs_recipe_end_to_end_writes_one_fp16_model_and_resumes(acs_run):
    config, out, card_path = acs_run
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    assert card["name"] == "ct-liver-tumor-acs" and card["weights"]["dtype"] == "float16"
    assert card["architecture"]["name"] == "converted" and card["architecture"]["config"]["to"] == "acs"
    assert set(card["training"]["recipe"]["seconds"]) == {"source_s", "target_s"}
    init = json.loads((out / "target" / "init_weights.json").read_text(encoding="utf-8"))
    assert init["converted_to"] == "acs" and init["loaded"] > 0 and not init["not_in_weights"]
    # fp16 storage: the shipped network equals the trained one rounded to half precision
    trained = load_model(out / "target" / "model" / "ct-liver-tumor-acs-target.json", device="cpu").network
    shipped = load_model(card_path, device="cpu").network
    for (key, a), b in zip(trained.state_dict().items(), shipped.state_dict().values()):
        assert torch.equal(a.half().to(a.dtype) if a.is_floating_point() else a, b), key
    stamp = (out / "target" / "result.json").stat().st_mtime_ns
    assert run_recipe(config, out) == card_path
    assert (out / "target" / "result.json").stat().st_mtime_ns == stamp  # resumed, nothing retrained
    volume, _ = ct_phantom(7, shape=(20, 48, 48))
    result = run(volume, model=str(card_path), device="cpu")
    assert result.labels.shape == volume.shape


def test_ahnet_recipe_transfers_the_mcgcn_encoder(tmp_path):
    config = tiny("ct-liver-tumor-ahnet")
    config["source"]["architecture"]["config"].update(kernel_sizes=[7, 5, 3, 3, 3, 1], gcn_channels=4)
    config["source"]["patch_size"] = [2, 32, 32]
    config["target"]["architecture"]["config"].update(growth_rate=4, bottleneck_factor=2, psp_sizes=[4, 2, 1, 1])
    config["target"]["patch_size"] = [32, 32, 32]
    config["target"]["inference"]["patch_size"] = [32, 64, 64]
    card_path = run_recipe(config, tmp_path)
    assert json.loads(Path(card_path).read_text(encoding="utf-8"))["weights"]["dtype"] == "float16"
    model_2d = tmp_path / "source" / "model" / "ct-liver-tumor-ahnet-source.json"
    mcgcn = load_model(model_2d, device="cpu").network.net.state_dict()
    network, _ = network_from_config(_target_config(config, tmp_path, {"transfer_from": str(model_2d)}), "cpu")
    ahnet = network.state_dict()
    # AH-Net sec. 3.2: a 3×3 kernel becomes 3×3×1 (here (1, 3, 3) in (k, j, i)), the 3-slice stem a 3-deep kernel
    assert torch.equal(ahnet["encoder.layer1.0.conv1.weight"][:, :, 0], mcgcn["encoder.layer1.0.conv1.weight"])
    assert torch.equal(ahnet["encoder.conv1.weight"][:, 0].transpose(0, 1),
                       mcgcn["encoder.conv1.weight"].transpose(0, 1))
    assert torch.equal(ahnet["encoder.bn1.running_var"], mcgcn["encoder.bn1.running_var"])


def test_transfer_recipe_refuses_what_it_cannot_run(tmp_path):
    config = tiny_acs()
    with pytest.raises(TransferSegError, match="target.init_weights: is set by the recipe"):
        validate_recipe(dict(config, target={**config["target"], "init_weights": "x.json"}))
    with pytest.raises(TransferSegError, match="must be an architecture the 2D network transfers into"):
        validate_recipe(dict(config, target={**config["target"], "architecture": {"name": "unet3d", "config": {}}}))
    with pytest.raises(TransferSegError, match="unknown key; a transfer recipe has"):
        validate_recipe(dict(config, fusion={}))
    with pytest.raises(TransferSegError, match="source"):
        validate_recipe({k: v for k, v in config.items() if k != "source"})
    assert not list(Path(tmp_path).iterdir())  # nothing written for a refused config
    with pytest.raises(TransferSegError, match="storage_dtype"):
        validate_config(dict(config["target"], name="x", labels=config["labels"], data=config["data"],
                             storage_dtype="int8"))


def test_dbt_recipe_trains_both_heatmap_networks_with_the_shared_keys(tmp_path, monkeypatch):
    """The shipped DBT detector (MC-GCN → AH-Net) is one recipe: each part reaches the trainer as the
    shared keys (task "heatmap", peaks, working grid …) plus its own, and the shipped model is a
    heatmap model whose encoder came from the trained MC-GCN."""
    import copy

    from TransferSegLib.phantoms import dbt_phantom
    from TransferSegLib.training import load_config, recipes

    shipped = load_config(CONFIGS / "dbt-lesion-ahnet.json")
    checked = validate_recipe(shipped)
    assert checked["task"] == "heatmap" and checked["target"]["architecture"]["name"] == "ahnet"
    assert checked["source"]["architecture"]["name"] == "mcgcn_multislice"
    config = copy.deepcopy(shipped)
    config["data"] = {"phantom": "dbt", "count": 2, "seed": 40,
                      "options": {"shape": [32, 48, 48], "pixel_mm": 0.5, "masses": 1, "calcification_clusters": 1}}
    for part in ("source", "target"):
        for stage in config[part]["stages"]:
            stage["steps"] = 2
    config["source"]["architecture"]["config"].update(kernel_sizes=[7, 5, 3, 3, 3, 1], gcn_channels=4)
    config["source"]["patch_size"] = [2, 32, 32]
    config["target"]["architecture"]["config"].update(growth_rate=4, bottleneck_factor=2, psp_sizes=[4, 2, 1, 1])
    config["target"]["patch_size"] = [32, 32, 32]
    config["target"]["inference"]["patch_size"] = [32, 64, 64]
    seen, real_train = {}, recipes.train

    def recording_train(sub, out, **kwargs):
        seen[Path(out).name] = copy.deepcopy(sub)
        return real_train(sub, out, **kwargs)

    monkeypatch.setattr(recipes, "train", recording_train)
    card_path = run_recipe(config, tmp_path)
    assert sorted(seen) == ["source", "target"]
    source_model = tmp_path / "source" / "model" / "dbt-lesion-ahnet-source.json"
    shared = {k: v for k, v in config.items() if k not in ("recipe", "source", "target", "data", "name", "_comment")}
    for part, sub in seen.items():
        expected = dict(shared, **config[part], name=f"dbt-lesion-ahnet-{part}",
                        data=dict(config["data"], cache=str(tmp_path / "cases")))
        if part == "target":
            expected["init_weights"] = {"transfer_from": str(source_model)}
        assert sub == expected, part
    card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    assert card["task"] == "heatmap" and card["peaks"] == config["peaks"] and card["weights"]["dtype"] == "float16"
    assert card["architecture"]["name"] == "ahnet" and card["name"] == "dbt-lesion-ahnet"
    volume, _ = dbt_phantom(7, (16, 40, 40), pixel_mm=0.5)
    result = run(volume, model=str(card_path), device="cpu")
    assert result.heatmap_on_input().shape == volume.shape and isinstance(result.detections, list)
    np.testing.assert_allclose(result.heatmap.spacing, card.get("working_spacing_mm") or volume.spacing, rtol=0.05)
