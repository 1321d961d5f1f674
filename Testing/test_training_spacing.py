"""Training on the spacings users have: varied phantom grids, the pipeline's resampling, a case cache."""
from __future__ import annotations

import numpy as np
import pytest

from TransferSegLib import phantoms
from TransferSegLib.datasets import negative_cases, phantom_cases
from TransferSegLib.models import load_model
from TransferSegLib.resample import labels_to_spacing, to_orientation, to_spacing
from TransferSegLib.training import train, validate_config
from TransferSegLib.training.sampling import cases_from_spec
from TransferSegLib.volume import TransferSegError

LABELS = [{"name": "liver", "label": 1}, {"name": "liver tumor", "label": 2}]


def _config(cache, **changes):
    config = {
        "name": "spacing-test", "seed": 3, "labels": LABELS,
        "architecture": {"name": "unet3d", "config": {"in_channels": 1, "out_channels": 3, "base_channels": 2,
                                                      "levels": 2}},
        "data": {"phantom": "ct", "count": 3, "seed": 70, "vary": {"slices": [10, 20], "rows": [40, 72]},
                 "cache": str(cache)},
        "validation": {"fraction": 0.0},
        "preprocessing": {"hu_window": [-200, 250]},
        "working_spacing_mm": [12.0, 9.0, 9.0], "working_orientation": "LPS",
        "patch_size": [8, 16, 16],
        "stages": [{"name": "all", "steps": 2, "optimizer": {"name": "adam", "lr": 0.001}, "loss": {"name": "ce"}}],
        "checkpoint_every": 100, "threads": 1, "progress_bar": False,
    }
    config.update(changes)
    return config


def test_varied_phantoms_have_varied_grids_and_are_reproducible():
    cases = phantom_cases("ct", 6, 70, vary={"slices": [10, 20], "rows": [40, 72]})
    shapes = {tuple(c.options["shape"]) for c in cases}
    assert len(shapes) == 6 and all(10 <= s[0] <= 20 and 40 <= s[1] == s[2] <= 72 for s in shapes)
    again = phantom_cases("ct", 6, 70, vary={"slices": [10, 20], "rows": [40, 72]})
    assert [c.options for c in again] == [c.options for c in cases]
    dbt = phantom_cases("dbt", 5, 1, vary={"pixel_mm": [0.085, 0.4], "extent_mm": [100, 75]})
    pixels = [c.options["pixel_mm"] for c in dbt]
    assert min(pixels) >= 0.085 and max(pixels) <= 0.4 and len(set(pixels)) == 5
    for c in dbt:  # the detector's extent stays about 100 × 75 mm whatever the pixel size
        rows, columns = c.options["shape"][1:]
        assert 88 <= rows * c.options["pixel_mm"] <= 112 and 66 <= columns * c.options["pixel_mm"] <= 84
    scaled = phantom_cases("dbt", 5, 1, vary={"pixel_mm": [0.085, 0.4], "extent_mm": [100, 75],
                                              "extent_scale": [2.0, 2.5]})
    for c, plain in zip(scaled, dbt):  # the same pixel sizes, the breast 2-2.5 times as wide and long
        assert c.options["pixel_mm"] == plain.options["pixel_mm"]
        ratio = np.array(c.options["shape"][1:]) / np.array(plain.options["shape"][1:])
        assert 1.95 <= ratio.min() and ratio.max() <= 2.55 and abs(ratio[0] - ratio[1]) < 0.05
    with pytest.raises(TransferSegError, match="extent_scale scales vary.extent_mm"):
        phantom_cases("dbt", 1, 0, vary={"pixel_mm": [0.1, 0.2], "extent_scale": [1, 2]})
    with pytest.raises(TransferSegError, match="'vary' keys for ct"):
        phantom_cases("ct", 1, 0, vary={"pixel_mm": [0.1, 0.2]})
    with pytest.raises(TransferSegError, match="low ≤ high"):
        phantom_cases("ct", 1, 0, vary={"rows": [300, 200]})


def test_the_config_checks_working_spacing_and_orientation(tmp_path):
    assert validate_config(_config(tmp_path))["expected_spacing_mm"] == [12.0, 9.0, 9.0]
    with pytest.raises(TransferSegError, match="working_spacing_mm"):
        validate_config(_config(tmp_path, working_spacing_mm=[1, 0, 1]))
    with pytest.raises(TransferSegError, match="working_orientation"):
        validate_config(_config(tmp_path, working_orientation="LLS"))


def test_training_cases_are_on_the_pipelines_working_grid_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    result = train(_config(cache), tmp_path / "run")
    card = load_model(result.card_path).card
    assert card["working_spacing_mm"] == [12.0, 9.0, 9.0] and card["working_orientation"] == "LPS"
    # the trained range is the cases' own spacings
    spacings = np.array([phantoms.ct_phantom(c.seed, **c.options)[0].spacing
                         for c in phantom_cases("ct", 3, 70, vary={"slices": [10, 20], "rows": [40, 72]})])
    np.testing.assert_allclose(card["trained_spacing_mm"]["min"], spacings.min(0), atol=1e-4)
    np.testing.assert_allclose(card["trained_spacing_mm"]["max"], spacings.max(0), atol=1e-4)
    # each cached case is exactly what the pipeline's resampling makes of the phantom
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 3
    case = phantom_cases("ct", 1, 70, vary={"slices": [10, 20], "rows": [40, 72]})[0]
    volume, labels = case.load()
    oriented, turn = to_orientation(volume, "LPS")
    working = to_spacing(oriented, [12.0, 9.0, 9.0])
    with np.load(next(f for f in files if f.name.startswith("ct-phantom-70-")), allow_pickle=False) as stored:
        np.testing.assert_array_equal(stored["image"], working.array)
        np.testing.assert_array_equal(stored["target"], labels_to_spacing(turn.apply(labels), oriented, working))
    # a second run with the same cache generates nothing
    def no_generation(*args, **kwargs):
        raise AssertionError("a cached case was generated again")

    monkeypatch.setattr(phantoms, "ct_phantom", no_generation)
    again = train(_config(cache, name="spacing-test-2"), tmp_path / "run2")
    assert again.finished and len(list(cache.glob("*.npz"))) == 3


def test_cases_are_generated_by_worker_processes(tmp_path):
    config = _config(tmp_path / "cache")
    config["data"]["workers"] = 2
    config["stages"][0]["steps"] = 1
    result = train(config, tmp_path / "run")
    assert result.finished and len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_a_cache_folder_in_a_config_file_is_relative_to_it(tmp_path, monkeypatch):
    import json

    from TransferSegLib.training import load_config

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "c.json").write_text(json.dumps(_config("cases-cache")), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_config(folder / "c.json")["data"]["cache"] == str(folder / "cases-cache")


def test_negatives_add_ct_phantoms_without_a_liver_to_the_training_cases(tmp_path):
    """data.negatives: regions without a liver (all-zero labels) beside the CT phantoms, their grids
    drawn from vary, the regions taken in turn; a bad spec is named before any case is drawn."""
    spec = {"phantom": "ct", "count": 2, "seed": 5, "vary": {"slices": [12, 16], "rows": [48, 56]},
            "options": {"phase": "random"}, "negatives": {"count": 3, "seed": 900, "regions": ["pelvis", "chest"]}}
    cases = cases_from_spec(spec)
    assert [c.name for c in cases] == ["ct-phantom-5", "ct-phantom-6", "ct-pelvis-900", "ct-chest-901", "ct-pelvis-902"]
    for case in cases[2:]:
        volume, labels = case.load()
        assert volume.shape == tuple(case.options["shape"]) and 12 <= volume.shape[0] <= 16
        assert labels.shape == volume.shape and not labels.any(), case.name
        assert volume.array.min() < -500 and volume.array.max() > 300  # CT in HU: air and bone
    assert [c.options for c in negative_cases(spec["negatives"], vary=spec["vary"], phase="random")] == \
        [c.options for c in cases[2:]]
    for bad, message in ((dict(spec["negatives"], regions=["abdomen"]), "negatives.regions"),
                         (dict(spec["negatives"], count=0), "negatives.count")):
        with pytest.raises(TransferSegError, match=message):
            validate_config(_config(tmp_path, data=dict(spec, negatives=bad)))
    with pytest.raises(TransferSegError, match="data.negatives"):
        validate_config(_config(tmp_path, data={"phantom": "ct", "count": 2, "negatives": ["pelvis"]}))
