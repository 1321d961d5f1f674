"""DBT lesion detection training (AH-Net sec. 4.1): DBT phantom cases with eq. (5) heatmaps,
the slice-wise MC-GCN ("mcgcn_multislice"), the MC-GCN → AH-Net transfer as a trainer
initialisation (``init_weights.transfer_from``), and a short heatmap training run end to end.

Everything is tiny (ResNet18 at 32-voxel patches, phantoms of 32×64×64 at 1.6 mm) so the file
runs in well under a minute on two cores.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import randomize_bn
from TransferSegLib.datasets import Case, DBTPhantomCase, phantom_cases
from TransferSegLib.heatmaps import box_contains, find_peaks, gaussian_heatmap
from TransferSegLib.models import load_model, save_model
from TransferSegLib.nets import AHNet, MCGCN, MultiSliceMCGCN, build_network, transfer_mcgcn_to_ahnet
from TransferSegLib.phantoms import ct_phantom, dbt_phantom
from TransferSegLib.training import network_from_config, train, validate_config
from TransferSegLib.training.sampling import _cache_key
from TransferSegLib.volume import TransferSegError

TINY_PHANTOM = {"shape": [32, 64, 64], "pixel_mm": 1.6, "masses": 1, "calcification_clusters": 1}
TINY_GCN = {"in_channels": 3, "out_channels": 1, "backbone": "resnet18", "kernel_sizes": [5, 3, 3, 3, 3, 3],
            "gcn_channels": 2, "slice_batch": 4}
TINY_AH = {"in_channels": 1, "out_channels": 1, "backbone": "resnet18", "stem_slices": 3, "growth_rate": 2,
           "dense_layers": 1, "bottleneck_factor": 2, "psp_sizes": [4, 2]}
LESION = [{"name": "lesion", "label": 1, "color": [1.0, 0.85, 0.1]}]


def heatmap_config(**overrides) -> dict:
    base = {
        "name": "tiny-dbt", "task": "heatmap", "seed": 2,
        "architecture": {"name": "ahnet", "config": dict(TINY_AH)},
        "labels": LESION,
        "data": {"phantom": "dbt", "count": 2, "seed": 40, "options": TINY_PHANTOM},
        "validation": {"fraction": 0.0},
        "preprocessing": {"normalise": "minmax"},
        "patch_size": [32, 32, 32], "batch_size": 2, "positive_fraction": 0.7,
        "stages": [{"name": "decoder", "steps": 5, "frozen": ["encoder"], "freeze_bn": True,
                    "optimizer": {"name": "adam", "lr": 0.001}, "loss": {"name": "l2"}},
                   {"name": "joint", "steps": 5, "optimizer": {"name": "adam", "lr": 0.001},
                    "loss": {"name": "l2", "switch": {"to": {"name": "focal_l2", "scale": 100.0}, "at_step": 2}}}],
        "inference": {"overlap": 0.25, "activation": "none"},
        "peaks": {"threshold": 0.1, "min_distance": [2, 4, 4]},
        "checkpoint_every": 100, "threads": 2, "progress_bar": False,
    }
    base.update(overrides)
    return base


@pytest.fixture(scope="module")
def mcgcn_model(tmp_path_factory):
    """A saved tiny "mcgcn_multislice" model with random BatchNorm statistics."""
    torch.manual_seed(5)
    network = randomize_bn(build_network("mcgcn_multislice", TINY_GCN))
    card = {"name": "tiny-mcgcn", "version": "0.0.1", "task": "heatmap", "labels": LESION,
            "architecture": {"name": "mcgcn_multislice", "config": network.config}, "preprocessing": {},
            "patch_size": [8, 32, 32], "inference": {"activation": "none"}}
    return save_model(network, card, tmp_path_factory.mktemp("mcgcn"))


# --- DBT phantom cases ----------------------------------------------------------------------------
def test_dbt_cases_give_eq5_heatmaps_peaking_inside_their_boxes():
    cases = phantom_cases("dbt", 3, 11, **TINY_PHANTOM)
    assert [c.name for c in cases] == ["dbt-phantom-11", "dbt-phantom-12", "dbt-phantom-13"]
    for case in cases:
        assert isinstance(case, DBTPhantomCase)
        volume, heatmap = case.load()
        reference, boxes = dbt_phantom(case.seed, **TINY_PHANTOM)  # the same phantom, made independently
        np.testing.assert_array_equal(volume.array, reference.array)
        assert case.boxes == boxes and len(boxes) == 2
        assert heatmap.dtype == np.float32 and heatmap.shape == volume.shape
        np.testing.assert_array_equal(heatmap, gaussian_heatmap(volume.shape, boxes))
        # every box holds a heatmap peak near 1, and every strong peak lies in a box
        peaks = find_peaks(heatmap, threshold=0.5, min_distance=1)
        for box in boxes:
            inside = [p for p in peaks if box_contains(box, p.position_kji)]
            assert inside and max(p.confidence for p in inside) > 0.8, (case.name, box)
        assert all(any(box_contains(b, p.position_kji) for b in boxes) for p in peaks)


def test_dbt_case_boxes_without_loading_and_ct_cases_unchanged():
    case = phantom_cases("dbt", 1, 3, **TINY_PHANTOM)[0]
    assert case.boxes == dbt_phantom(3, **TINY_PHANTOM)[1]  # generated on demand
    ct = phantom_cases("ct", 1, 0)[0]
    assert isinstance(ct, Case) and ct.name == "ct-phantom-0" and not hasattr(ct, "boxes")
    np.testing.assert_array_equal(ct.load()[1], ct_phantom(0)[1])
    with pytest.raises(TransferSegError, match="'ct'.*'dbt'"):
        phantom_cases("mri", 1, 0)


def test_a_heatmap_target_keeps_only_its_kinds_and_floors_sigma_in_mm():
    options = dict(TINY_PHANTOM, masses=2, calcification_clusters=2)
    plain = phantom_cases("dbt", 1, 5, **options)[0]
    masses = phantom_cases("dbt", 1, 5, target={"kinds": ["mass"], "sigma_floor_mm": 3.0}, **options)[0]
    volume, boxes = dbt_phantom(5, **options)
    assert plain.boxes == boxes and masses.boxes == [b for b in boxes if b["kind"] == "mass"]
    assert {b["kind"] for b in boxes} == {"mass", "calcification_cluster"} and len(masses.boxes) == 2
    image, heatmap = masses.load()
    np.testing.assert_array_equal(image.array, volume.array)
    floor = [3.0 / s for s in volume.spacing]  # σ of at least 3 mm, in voxels of each axis
    np.testing.assert_array_equal(heatmap, gaussian_heatmap(volume.shape, masses.boxes, min_sigma=floor))
    for cluster in (b for b in boxes if b["kind"] == "calcification_cluster"):  # no target where the clusters are
        k, j, i = (int(round(v)) for v in cluster["center_kji"])
        assert heatmap[k, j, i] < plain.load()[1][k, j, i] or plain.load()[1][k, j, i] < 1e-3
    assert np.count_nonzero(heatmap > 0.5) > np.count_nonzero(gaussian_heatmap(volume.shape, masses.boxes) > 0.5)
    # the training cache tells the targets apart, and a case without one keeps its old cache name
    config = {"working_spacing_mm": [1.0, 0.5, 0.5], "working_orientation": None, "task": "heatmap"}
    assert _cache_key(plain, config) != _cache_key(masses, config)
    assert _cache_key(plain, config) == _cache_key(DBTPhantomCase(plain.name, seed=5, options=plain.options), config)
    for bad, match in (({"kinds": ["cyst"]}, "kinds"), ({"sigma_floor_mm": -1}, "sigma_floor_mm"),
                       ({"sigma": 1}, "keys")):
        with pytest.raises(TransferSegError, match=match):
            phantom_cases("dbt", 1, 5, target=bad, **options)
    with pytest.raises(TransferSegError, match="CT phantoms"):
        phantom_cases("ct", 1, 0, target={"kinds": ["mass"]})


# --- the slice-wise MC-GCN ------------------------------------------------------------------------
def test_mcgcn_multislice_equals_mcgcn_on_hand_built_three_slice_stacks():
    torch.manual_seed(0)
    wrapped = randomize_bn(MultiSliceMCGCN(**TINY_GCN)).eval()
    assert isinstance(wrapped.net, MCGCN) and wrapped.size_multiple == (1, 32, 32)
    assert wrapped.config == dict(wrapped.net.config, slice_batch=4)
    rebuilt = build_network("mcgcn_multislice", json.loads(json.dumps(wrapped.config)))
    rebuilt.load_state_dict(wrapped.state_dict(), strict=True)

    volume = torch.randn(1, 1, 5, 32, 32)
    with torch.no_grad():
        actual = rebuilt.eval()(volume)  # 5 stacks, 4 per call
        for d in range(5):
            neighbours = [max(d - 1, 0), d, min(d + 1, 4)]  # clamped at the ends
            expected = wrapped.net(volume[0, 0, neighbours][None])[0]
            torch.testing.assert_close(actual[0, :, d], expected, atol=1e-5, rtol=1e-5)


# --- init_weights.transfer_from --------------------------------------------------------------------------
def test_transfer_from_gives_the_mcgcn_encoder_in_3d_and_a_seeded_decoder(mcgcn_model):
    mcgcn = load_model(mcgcn_model).network.net
    config = validate_config(heatmap_config(init_weights={"transfer_from": str(mcgcn_model)}))
    network, _ = network_from_config(config, torch.device("cpu"))
    assert isinstance(network, AHNet)

    reference = transfer_mcgcn_to_ahnet(mcgcn, **TINY_AH)
    for name, value in reference.encoder.state_dict().items():
        assert torch.equal(network.encoder.state_dict()[name], value), name
    # eq. (1) for the input layer, eqs. (2)-(3) for every other conv; BN statistics included
    assert torch.equal(network.encoder.conv1.weight, mcgcn.encoder.conv1.weight.unsqueeze(1))
    assert torch.equal(network.encoder.layer3[0].conv2.weight, mcgcn.encoder.layer3[0].conv2.weight.unsqueeze(2))
    assert torch.equal(network.encoder.layer2[1].bn1.running_var, mcgcn.encoder.layer2[1].bn1.running_var)
    assert not torch.equal(network.encoder.layer2[1].bn1.running_var, torch.ones(128))
    # the decoder is the one the config's seed gives, as without a transfer
    torch.manual_seed(config["seed"])
    fresh = AHNet(**TINY_AH)
    for name, value in fresh.state_dict().items():
        if not name.startswith("encoder."):
            assert torch.equal(network.state_dict()[name], value), name


def test_transfer_from_refuses_what_does_not_fit(mcgcn_model):
    wrong_backbone = heatmap_config(init_weights={"transfer_from": str(mcgcn_model)},
                                    architecture={"name": "ahnet", "config": dict(TINY_AH, backbone="resnet34")})
    with pytest.raises(TransferSegError, match="architecture.config: backbone is 'resnet34'.*'resnet18'"):
        network_from_config(validate_config(wrong_backbone), torch.device("cpu"))
    not_ahnet = heatmap_config(init_weights={"transfer_from": str(mcgcn_model)},
                               architecture={"name": "unet3d", "config": {"out_channels": 1}})
    with pytest.raises(TransferSegError, match="init_weights.transfer_from.*'ahnet'"):
        validate_config(not_ahnet)
    with pytest.raises(TransferSegError, match="data.phantom.*heatmap"):
        validate_config(heatmap_config(task="segmentation"))
    with pytest.raises(TransferSegError, match="peaks.min_distance"):
        validate_config(heatmap_config(peaks={"min_distance": [1, 2]}))


# --- a short run end to end ---------------------------------------------------------------------------
def test_ten_step_ahnet_heatmap_training_on_dbt_phantoms_writes_a_heatmap_model(tmp_path, mcgcn_model):
    from TransferSegLib.pipeline import run

    config = heatmap_config(init_weights={"transfer_from": str(mcgcn_model)})
    result = train(config, tmp_path / "run")
    assert result.finished and result.steps == 10
    card = json.loads(result.card_path.read_text())
    assert card["task"] == "heatmap" and card["architecture"]["name"] == "ahnet"
    assert card["inference"]["activation"] == "none" and card["peaks"] == config["peaks"]
    assert card["training"]["data"]["phantom"] == "dbt"
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    assert [r.split(",")[5] for r in rows] == ["l2"] * 7 + ["focal_l2"] * 3

    model = load_model(result.card_path)
    volume, _ = phantom_cases("dbt", 1, 99, **TINY_PHANTOM)[0].load()
    detected = run(volume, model, device="cpu")
    assert detected.heatmap_on_input().shape == volume.shape and isinstance(detected.detections, list)
