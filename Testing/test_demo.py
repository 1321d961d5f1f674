"""`transferseg demo` (TransferSegLib.demo.run_demo) end to end with the shipped models, on smaller
grids and fewer DBT phantoms passed to the same function: every promised file is there and valid,
the scores are the phantoms' truth scored independently here, the printed table has every row,
and a missing model skips its step in one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from TransferSegLib import demo
from TransferSegLib.cli import main
from TransferSegLib.io import load_volume
from TransferSegLib.phantoms import CT_DEFAULT_SHAPE, ct_phantom, dbt_phantom

SMALL = dict(seed=3, ct_shape=CT_DEFAULT_SHAPE, dbt_shape=(16, 128, 96), dbt_volumes=3, device="cpu")
PROMISED = {
    "ct": ["ct.nii.gz", "truth.nii.gz", "truth.png"],
    "ct-unet3d": ["segmentation.seg.nrrd", "labelmap.nii.gz", "overview.png", "lesions.csv", "report.html",
                  "result.json"],
    "ct-vfn": ["segmentation.seg.nrrd", "labelmap.nii.gz", "views/axial.nii.gz", "views/coronal.nii.gz",
               "views/sagittal.nii.gz", "disagreement.nii.gz", "overview.png", "views.png", "lesions.csv",
               "report.html", "result.json", "views-side-by-side.png", "disagreement.png"],
    "dbt": ["dbt.nii.gz", "lesions.json"],
    "dbt-ahnet": ["heatmap.nii.gz", "detections.json", "detections.csv", "overview.png", "lesions.csv", "report.html",
                  "result.json", "detections.png"],
    "froc": ["froc.json", "froc.png"],
}
PROMISED_FILES = sorted([f"{step}/{name}" for step, names in PROMISED.items() for name in names]
                        + ["summary.json", "summary.txt"])


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    lines = []
    with pytest.MonkeyPatch.context() as patch:  # only the shipped models are found
        patch.setenv("TRANSFERSEG_MODELS", str(out.parent / "no-user-models"))
        summary = demo.run_demo(out, log=lines.append, **SMALL)
    return out, summary, lines


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_every_promised_file_is_written_and_valid(small_demo):
    out, summary, _ = small_demo
    assert summary["files"] == PROMISED_FILES
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == PROMISED_FILES  # and nothing else: no temporary file left behind
    ct_shape = tuple(summary["ct"]["shape"])
    for name in PROMISED_FILES:
        path = out / name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
            image = imread(path)
            assert image.ndim == 3 and min(image.shape[:2]) > 100 and image[..., :3].std() > 0.05, name
        elif name.endswith(".seg.nrrd"):
            assert _array(path).size > 0, name  # stores the segments' extent, not the whole grid
        elif name == "dbt-ahnet/heatmap.nii.gz":  # on the model's working grid, covering the DBT's box exactly
            heatmap, dbt = load_volume(path), load_volume(out / "dbt" / "dbt.nii.gz")
            corners = [[-0.5, -0.5, -0.5], [n - 0.5 for n in heatmap.shape]]
            np.testing.assert_allclose(heatmap.ijk_to_ras_points(np.array(corners)),
                                       dbt.ijk_to_ras_points(np.array([[-0.5, -0.5, -0.5], [n - 0.5 for n in dbt.shape]])),
                                       atol=1e-4)
        elif name.endswith(".nii.gz"):
            array = _array(path)
            shape = ct_shape if name.startswith("ct") else tuple(SMALL["dbt_shape"])
            assert array.shape[-3:] == shape or array.shape[:3] == shape, (name, array.shape)
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
    assert summary["layout"].keys() == PROMISED.keys()


def test_the_dice_values_are_the_phantom_truth_scored_independently(small_demo):
    out, summary, _ = small_demo
    _, truth = ct_phantom(SMALL["seed"], shape=SMALL["ct_shape"])
    assert np.array_equal(_array(out / "ct" / "truth.nii.gz"), truth)  # the truth written is the phantom's
    rows = {row["step"]: row for row in summary["rows"]}
    for step in ("ct-unet3d", "ct-vfn"):
        labels = _array(out / step / "labelmap.nii.gz")
        for region, pred, ref in (("liver", labels >= 1, truth >= 1), ("tumor", labels == 2, truth == 2)):
            both = np.count_nonzero(pred) + np.count_nonzero(ref)
            expected = 2.0 * np.count_nonzero(pred & ref) / both if both else 1.0
            assert rows[step]["dice"][region] == pytest.approx(expected, abs=1e-12), (step, region)
            assert 0.0 <= rows[step]["dice"][region] <= 1.0
        assert rows[step]["dice"]["liver"] > 0.85, step  # the shipped models find the liver on a new phantom
    for view, scores in rows["ct-vfn"]["views_dice"].items():
        probabilities = _array(out / "ct-vfn" / "views" / f"{view}.nii.gz")  # (k, j, i, class)
        labels = probabilities.argmax(axis=-1)
        liver = labels >= 1
        assert scores["liver"] == pytest.approx(2.0 * np.count_nonzero(liver & (truth >= 1))
                                                / (np.count_nonzero(liver) + np.count_nonzero(truth >= 1)))


def test_lesions_found_and_false_positives_are_counted_against_the_truth_boxes(small_demo):
    out, summary, _ = small_demo
    rows = {row["step"]: row for row in summary["rows"]}
    lesions = json.loads((out / "dbt" / "lesions.json").read_text())["lesions"]
    assert lesions == json.loads(json.dumps(dbt_phantom(SMALL["seed"], shape=SMALL["dbt_shape"])[1]))
    detections = json.loads((out / "dbt-ahnet" / "detections.json").read_text())["detections"]
    threshold = rows["dbt-ahnet"]["threshold"]
    assert all(d["confidence"] >= threshold for d in detections)

    def inside(box, point):
        return all(lo <= p < hi for p, lo, hi in zip(point, box[:3], box[3:]))

    found = sum(any(inside(lesion["box_kji"], d["position_kji"]) for d in detections) for lesion in lesions)
    false_positives = sum(not any(inside(lesion["box_kji"], d["position_kji"]) for lesion in lesions)
                          for d in detections)
    point = rows["dbt-ahnet"]["lesions_found"]
    assert (point["found"], point["lesions"], point["false_positives"]) == (found, len(lesions), false_positives)

    froc = json.loads((out / "froc" / "froc.json").read_text())
    total = sum(len(dbt_phantom(SMALL["seed"] + n, shape=SMALL["dbt_shape"])[1]) for n in range(SMALL["dbt_volumes"]))
    assert froc["lesions"] == total == rows["froc"]["lesions_found"]["lesions"]
    assert froc["volumes"] == SMALL["dbt_volumes"]
    assert froc["fp_per_volume"] == sorted(froc["fp_per_volume"]) and froc["tpr"] == sorted(froc["tpr"])
    assert all(0.0 <= v <= 1.0 for v in froc["tpr"] + list(froc["tpr_at_fp_per_volume"].values()))
    # the default threshold's point lies on the swept curve: no more lesions than every peak finds
    assert rows["froc"]["lesions_found"]["found"] <= round(froc["tpr"][-1] * froc["lesions"])
    assert rows["froc"]["lesions_found"]["found"] >= point["found"]  # the dbt phantom is one of them


def test_the_command_prints_the_table_with_every_row(small_demo, monkeypatch, capsys):
    out, summary, lines = small_demo
    assert [line.split()[0] for line in lines] == list(PROMISED)  # one line per step, as it ends

    def fake_run_demo(output_dir, log=None, **kwargs):
        for line in lines:
            log(line)
        return summary

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)  # the table of the run above, through the command
    assert main(["demo", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "summary.txt").read_text(encoding="utf-8").rstrip("\n")
    assert table == demo.format_summary(summary) and table in printed
    table_lines = table.splitlines()
    rows = {row["step"]: row for row in summary["rows"]}
    for step in ("ct-unet3d", "ct-vfn"):
        line = next(line for line in table_lines if line.startswith(step + " "))
        assert f"{rows[step]['dice']['liver']:.3f}" in line and f"{rows[step]['dice']['tumor']:.3f}" in line
        assert f"{rows[step]['timings_s']['total']:.1f}" in line
    for view in ("axial", "coronal", "sagittal"):
        assert f"  {view} network" in printed
    point = rows["dbt-ahnet"]["lesions_found"]
    line = next(line for line in table_lines if line.startswith("dbt-ahnet "))
    assert f"{point['found']}/{point['lesions']}" in line and f"{point['false_positives']}" in line
    assert next(line for line in table_lines if line.startswith("froc (3 DBT)"))
    assert "TPR at FP/volume: " in printed and "steps: ct " in printed
    for step in PROMISED:
        assert f"  {step}/" in printed  # the folder layout


def test_a_missing_model_skips_its_step_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERSEG_MODELS", str(tmp_path / "no-user-models"))
    lines = []
    missing = {step: "no-such-model" for step in demo.DEMO_MODELS}
    summary = demo.run_demo(tmp_path / "out", seed=1, ct_shape=(8, 48, 48), dbt_shape=(8, 64, 64), dbt_volumes=1,
                            models=missing, log=lines.append)
    said = [line for line in lines if "not installed" in line]
    assert [line.split(":")[0] for line in said] == ["ct-unet3d", "ct-vfn", "dbt-ahnet"]
    assert summary["skipped"] == ["ct-unet3d", "ct-vfn", "dbt-ahnet", "froc"]
    assert (tmp_path / "out" / "ct" / "ct.nii.gz").is_file() and (tmp_path / "out" / "dbt" / "dbt.nii.gz").is_file()
    table = demo.format_summary(summary)
    assert table.count("skipped: the model is not installed") == 4
