"""The models shipped in Resources/models work out of the box: they load (checksum verified),
their cards carry the held-out numbers the README quotes, and the commands' defaults find them
and give sensible results on phantoms none of them was trained on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from TransferSegLib import metrics
from TransferSegLib.datasets import phantom_cases
from TransferSegLib.masses import FEATURES as MASS_FEATURES
from TransferSegLib.models import DEFAULT_DETECTION_MODEL, DEFAULT_SEGMENTATION_MODEL, find_model, load_model
from TransferSegLib.phantoms import ct_phantom
from TransferSegLib.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "Resources" / "models"


@pytest.fixture(autouse=True)
def no_user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "empty"))  # only shipped models are found


def test_every_shipped_model_loads_and_is_a_default():
    cards = sorted(SHIPPED.glob("*.json"))
    names = {path.stem for path in cards}
    assert {DEFAULT_SEGMENTATION_MODEL, DEFAULT_DETECTION_MODEL} <= names
    for path in cards:
        loaded = load_model(path)  # verifies the sha256 and loads strictly
        assert loaded.name == path.stem
        assert not any(component.network.training for component in loaded.components.values())
        assert find_model(path.stem) == path
        assert not (SHIPPED / (path.stem + ".pt")).exists()


def test_default_segmentation_model_segments_a_new_ct_phantom():
    volume, reference = ct_phantom(seed=777)
    result = run(volume, load_model(DEFAULT_SEGMENTATION_MODEL), device="cpu")
    liver = metrics.dice(np.isin(result.labels, (1, 2)), np.isin(reference, (1, 2)))
    assert liver > 0.85, liver


def test_default_segmentation_model_segments_a_finer_grid_stored_the_other_way_round(tmp_path):
    """A grid finer than the old 4 mm phantoms (1.2 mm pixels), stored RAS-flipped: the pipeline
    turns and resamples it to the model's working grid, and the label map written by the CLI
    lies on the input's exact grid."""
    import SimpleITK as sitk

    from TransferSegLib.io import save_labelmap, save_volume
    from TransferSegLib.resample import to_orientation

    volume, reference = ct_phantom(seed=778, shape=(48, 320, 320))
    flipped, turn = to_orientation(volume, "RAS")
    source = save_volume(flipped, tmp_path / "ct.nii.gz")
    save_labelmap(turn.apply(reference), flipped, tmp_path / "truth.nii.gz")
    done = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "segment", str(source), "-o",
                           str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True,
                          encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    written = sitk.ReadImage(str(tmp_path / "out" / "labelmap.nii.gz"))
    original = sitk.ReadImage(str(source))
    assert written.GetSize() == original.GetSize()
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(written, get)(), getattr(original, get)(), atol=1e-5)
    labels = sitk.GetArrayFromImage(written)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "truth.nii.gz")))
    liver = metrics.dice(labels > 0, truth > 0)
    assert liver > 0.9, liver


def test_default_segmentation_model_card_carries_its_clinical_grid_numbers():
    card = json.loads((SHIPPED / f"{DEFAULT_SEGMENTATION_MODEL}.json").read_text(encoding="utf-8"))
    assert card["working_spacing_mm"] == [3.0, 2.0, 2.0] and card["working_orientation"] == "LPS"
    trained = card["trained_spacing_mm"]
    assert trained["min"][1] < 1.0 and trained["max"][0] <= 5.0  # the spacings users have
    clinical = card["metrics"]["heldout_clinical"]
    assert clinical["cases"] >= 10 and clinical["all_on_input_grid"] is True
    assert {"liver_dice_mean", "liver_dice_worst", "tumor_dice_global"} <= set(clinical)
    assert clinical["liver_dice_worst"]["dice"] > 0.85
    native = card["metrics"]["heldout_native"]
    assert native["liver_incl_tumor"]["dice_per_case"] >= 0.945  # no worse than the model it replaced (3.1.0)


def test_default_detection_model_card_carries_its_heldout_froc_per_kind():
    """The detector is two stages behind one card (masses: the AH-Net on its working grid; clusters:
    the speck classifier at the input's resolution), and the card says where it was scored:
    held-out phantoms (seeds no training or tuning case had) at the phantom's default grid and at
    a clinical 0.1 mm grid, over all lesions and per kind, with the lesions found and the false
    positives per volume at its default thresholds."""
    loaded = load_model(DEFAULT_DETECTION_MODEL)
    card = loaded.card
    assert card["task"] == "heatmap" and loaded.method["name"] == "dbt_lesions"
    assert set(loaded.components) == {"masses", "calcifications", "mass_candidates"}
    assert loaded.components["masses"].spec["architecture"]["name"] == "ahnet"
    assert loaded.components["calcifications"].spec["architecture"]["name"] == "speck_classifier"
    assert loaded.components["mass_candidates"].spec["architecture"]["config"]["in_features"] == len(MASS_FEATURES)
    assert card["working_spacing_mm"] and card["weights"]["dtype"] == "float16"
    sources = card["training"]["composed_from"]
    assert sources["masses"]["model"] == "dbt-masses-ahnet" and sources["calcifications"]["model"] == "dbt-calcifications"
    assert sources["mass_candidates"]["model"] == "dbt-mass-candidates"
    rescore = json.loads((ROOT / "Resources" / "configs" / "dbt-mass-candidates.json").read_text(encoding="utf-8"))
    for part in rescore["data"] + [rescore["validation"]]:  # the rescoring trains on phantoms the AH-Net never saw
        assert part["seed"] >= 2000 and part["seed"] + part["count"] <= 5000, part
    masses = json.loads((ROOT / "Resources" / "configs" / "dbt-masses-ahnet.json").read_text(encoding="utf-8"))["data"]
    metrics = card["metrics"]
    tuning = metrics["tuning"]["data"]
    for part in tuning if isinstance(tuning, list) else [tuning]:  # tuning seeds are neither training nor held-out ones
        assert part["seed"] >= masses["seed"] + masses["count"] and part["seed"] + part["count"] <= 5000, part
    assert metrics["tuning"]["mass_threshold"] == card["method"]["config"]["masses"]["threshold"]
    for part in rescore["data"]:  # tuning seeds are not the rescoring's training seeds either
        assert all(p["seed"] + p["count"] <= part["seed"] or p["seed"] >= part["seed"] + part["count"]
                   for p in (tuning if isinstance(tuning, list) else [tuning])), part
    for key in ("froc_heldout", "froc_heldout_clinical", "froc_heldout_check"):
        froc = metrics[key]
        assert set(froc["tpr_at_fp_per_volume"]) == {"0.01", "0.05", "0.1", "0.15", "0.2", "0.25"}
        assert froc["data"]["seed"] >= 5000 > masses["seed"] + masses["count"] and froc["data"]["seed"] >= 5000
        assert froc["lesions"] > 0 and froc["volumes"] == froc["data"]["count"] and froc["protocol"]
    for key in ("froc_heldout", "froc_heldout_clinical"):
        for kind in ("all", "mass", "calcification_cluster"):
            assert set(metrics[key][kind]["tpr_at_fp_per_volume"]) == set(metrics[key]["tpr_at_fp_per_volume"])
        assert metrics[key]["default_threshold"]["fp_per_volume"] >= 0
        assert set(metrics[key]["default_threshold"]["found"]) == {"mass", "calcification_cluster"}
    large = metrics["froc_heldout_large_breasts"]  # breasts of a clinical detector's size, where false peaks grow
    assert large["data"]["vary"]["extent_scale"][0] >= 1.8 and large["data"]["seed"] >= 5000
    assert large["volumes"] == large["data"]["count"] and set(large["default_threshold"]["found"]) == {"mass", "calcification_cluster"}
    assert metrics["froc_heldout"]["data"]["options"] == {}  # dbt_phantom's default grid
    assert metrics["froc_heldout_clinical"]["data"]["options"] == {"shape": [40, 1024, 768], "pixel_mm": 0.1}


def test_default_detection_model_reproduces_its_heldout_froc():
    """The shipped AH-Net on the first held-out phantoms of its card (``froc_heldout_check``, the
    default grid), through the product path: ``pipeline.run`` resamples to the working grid,
    finds the peaks there (the card's evaluation peaks) and maps them back to the input grid.
    The FROC is the card's, to one lesion (thread counts may reorder near-tied peaks)."""
    import dataclasses

    from TransferSegLib.phantoms import dbt_phantom

    loaded = load_model(DEFAULT_DETECTION_MODEL)
    test = loaded.card["metrics"]["froc_heldout_check"]  # every mass peak; clusters at the card's threshold
    model = dataclasses.replace(loaded, card=dict(loaded.card, peaks=test["peaks"]),
                                method=dict(loaded.method, config=test["method_config"]))
    detections, boxes = [], []
    for seed in range(test["data"]["seed"], test["data"]["seed"] + test["data"]["count"]):
        volume, lesions = dbt_phantom(seed, **test["data"]["options"])
        result = run(volume, model, device="cpu")
        assert np.isfinite(result.heatmap.array).all()
        np.testing.assert_allclose(result.heatmap.spacing, loaded.card["working_spacing_mm"], rtol=0.05)
        assert all(0 <= p < n for d in result.detections for p, n in zip(d.position_kji, volume.shape))
        detections.append(result.detections)
        boxes.append(lesions)
    curve = metrics.froc(detections, boxes)
    assert curve["lesions"] == test["lesions"] and curve["volumes"] == test["volumes"]
    for rate, tpr in test["tpr_at_fp_per_volume"].items():
        assert abs(curve["tpr_at"][float(rate)] - tpr) <= 1.0 / test["lesions"] + 1e-9, (rate, curve["tpr_at"])
    assert curve["tpr_at"][0.25] > 0  # it does find lesions
    kinds = metrics.found_by_kind(detections, boxes, rate=0.25)["kinds"]
    for kind, counts in test["found_by_kind_at_0.25"].items():  # the card's per-kind counts, to one lesion
        assert kinds[kind]["lesions"] == counts["lesions"] and abs(kinds[kind]["found"] - counts["found"]) <= 1, kinds


def test_detect_command_uses_the_shipped_default(tmp_path):
    from TransferSegLib.io import save_volume
    from TransferSegLib.phantoms import dbt_phantom

    volume, _ = dbt_phantom(seed=5001, shape=(32, 128, 96), pixel_mm=0.8)
    save_volume(volume, tmp_path / "dbt.nii.gz")
    done = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "detect", str(tmp_path / "dbt.nii.gz"),
                           "-o", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("heatmap.nii.gz", "detections.json", "detections.csv", "overview.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    detections = json.loads((tmp_path / "out" / "detections.json").read_text(encoding="utf-8"))
    assert detections["model"] == DEFAULT_DETECTION_MODEL


VFN_MODEL = "ct-liver-tumor-vfn"


def test_the_multiview_model_card_carries_the_fusion_comparison_and_its_clinical_numbers():
    """The shipped VFN model: three view networks and two fusion nets in one fp16 file, and its card
    carries the paper's comparison on held-out clinical grids (per view, MV, STAPLE, VFN, VFN
    without the image) and the end-to-end numbers the README quotes."""
    card = json.loads((SHIPPED / f"{VFN_MODEL}.json").read_text(encoding="utf-8"))
    assert card["method"]["name"] == "multiview" and card["method"]["config"]["fusion"] == "vfn"
    assert set(card["components"]) == {"axial", "coronal", "sagittal", "fusion", "fusion_noimage"}
    assert card["weights"]["dtype"] == "float16" and card["working_orientation"] == "LPS"
    fusions = card["metrics"]["heldout_clinical_fusions"]
    for name in ("axial", "coronal", "sagittal", "majority", "staple", "vfn", "vfn-noimage"):
        assert 0 < fusions[name]["liver_dice_mean"] <= 1 and 0 <= fusions[name]["tumor_dice_global"] <= 1
    clinical = card["metrics"]["heldout_clinical"]
    assert clinical["cases"] >= 10 and clinical["all_on_input_grid"] is True
    assert clinical["liver_dice_worst"]["dice"] > 0.85
    split = card["training"]["recipe"]["splits"][0]
    assert not set(split["views"]) & set(split["fusion"])  # the VFN learnt from cases the views never saw
    assert card["metrics"]["training_time"]["cpu_minutes"] > 0


def test_the_multiview_model_segments_a_new_phantom_with_views_and_disagreement():
    volume, reference = ct_phantom(seed=779, shape=(40, 256, 256))
    result = run(volume, load_model(VFN_MODEL), device="cpu")
    liver = metrics.dice(result.labels > 0, reference > 0)
    assert liver > 0.85, liver
    for view, probabilities in result.views.items():  # every view network finds the liver by itself
        assert metrics.dice(probabilities.argmax(axis=0) > 0, reference > 0) > 0.8, view
    inside = result.labels > 0
    assert result.disagreement[inside].mean() < 0.2  # the views mostly agree on the liver
    assert 0 <= result.method_summary["share_views_differ"] < 0.5


HDENSEUNET_MODEL = "ct-liver-tumor-hdenseunet"


def test_the_hdenseunet_model_card_carries_table2_and_its_clinical_numbers():
    """The shipped H-DenseUNet cascade: the coarse liver network and the H-DenseUNet in one fp16
    file, each on its own working grid; the card carries the Table II comparison (2D, 3D and
    H-DenseUNet in the same cascade) and the end-to-end numbers on held-out clinical grids."""
    card = json.loads((SHIPPED / f"{HDENSEUNET_MODEL}.json").read_text(encoding="utf-8"))
    assert card["method"] == {"name": "cascade", "config": {"thresholds": [0.5, 0.9], "slices": 8, "stride": 2,
                                                            "margin": 2, "box_margin_mm": 12}}
    assert set(card["components"]) == {"coarse", "fine"} and card["weights"]["dtype"] == "float16"
    assert card["components"]["coarse"]["working_spacing_mm"] == [6.0, 4.0, 4.0]
    assert card["components"]["fine"]["architecture"]["name"] == "hdenseunet"
    assert card["postprocessing"]["fill_holes"] == [1, 2]
    table = card["metrics"]["heldout_clinical_table2"]
    for name in ("2D DenseUNet", "3D DenseUNet", "H-DenseUNet"):
        assert 0 < table[name]["liver_dice_mean"] <= 1 and table[name]["seconds_mean"] > 0
    clinical = card["metrics"]["heldout_clinical"]
    assert clinical["cases"] >= 10 and clinical["all_on_input_grid"] is True
    assert clinical["liver_dice_worst"]["dice"] > 0.85
    assert card["metrics"]["training_time"]["cpu_minutes"] > 0


def test_the_hdenseunet_model_segments_a_new_phantom_inside_its_liver_box():
    volume, reference = ct_phantom(seed=781, shape=(40, 256, 256))
    result = run(volume, load_model(HDENSEUNET_MODEL), device="cpu")
    assert metrics.dice(result.labels > 0, reference > 0) > 0.85
    k0, j0, i0, k1, j1, i1 = result.method_summary["liver_box_kji"]
    assert k1 > k0 and j1 > j0 and i1 > i0


def test_every_shipped_model_is_fp16_and_all_fit_the_size_budget():
    """Issue budget: every shipped model stores half-precision weights; together < 60 MB in git."""
    cards = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(SHIPPED.glob("*.json"))]
    assert all(card["weights"]["dtype"] == "float16" for card in cards), [c["name"] for c in cards]
    total = sum((SHIPPED / card["weights"]["file"]).stat().st_size for card in cards)
    assert total == sum(card["weights"]["bytes"] for card in cards)
    assert total < 60e6, total


TRANSFER_MODELS = {"ct-liver-tumor-ahnet": ("ahnet", "MC-GCN (2D)", "AH-Net (3D)"),
                   "ct-liver-tumor-acs": ("converted", "2D U-Net", "ACS U-Net (3D)")}


@pytest.mark.parametrize("name", sorted(TRANSFER_MODELS))
def test_the_transfer_models_carry_the_2d_against_3d_comparison_and_segment_a_new_phantom(name):
    """The 2D → 3D transfer models: one network at the default's working grid, trained by the transfer
    recipe (its card names both parts), scored 2D against 3D and end to end on held-out clinical grids."""
    architecture, row_2d, row_3d = TRANSFER_MODELS[name]
    card = json.loads((SHIPPED / f"{name}.json").read_text(encoding="utf-8"))
    assert card["architecture"]["name"] == architecture
    assert card["working_spacing_mm"] == [3.0, 2.0, 2.0] and card["working_orientation"] == "LPS"
    assert set(card["training"]["recipe"]["seconds"]) == {"source_s", "target_s"}
    table = card["metrics"]["heldout_clinical_2d_vs_3d"]
    for row in (row_2d, row_3d, "3D U-Net (default)"):
        assert 0 < table[row]["liver_dice_mean"] <= 1 and table[row]["seconds_mean"] > 0
    clinical = card["metrics"]["heldout_clinical"]
    assert clinical["cases"] >= 10 and clinical["all_on_input_grid"] is True
    assert card["metrics"]["training_time"]["cpu_minutes"] > 0
    volume, reference = ct_phantom(seed=782, shape=(40, 256, 256))
    result = run(volume, load_model(name), device="cpu")
    assert metrics.dice(result.labels > 0, reference > 0) > 0.85
