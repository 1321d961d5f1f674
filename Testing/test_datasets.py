"""Dataset loaders read the layouts real users have: MSD, LiTS and TransferSeg phantom folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_image

from TransferSegLib.datasets import find_cases, split_cases
from TransferSegLib.volume import TransferSegError


def _pair(image_path, label_path, seed, shape=(4, 6, 8)):
    rng = np.random.default_rng(seed)
    write_image(rng.normal(size=shape).astype(np.float32), image_path)
    write_image(rng.integers(0, 3, size=shape).astype(np.uint8), label_path)


def test_medical_segmentation_decathlon_layout(tmp_path):
    root = tmp_path / "Task03_Liver"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for n in (0, 1, 10):
        _pair(root / "imagesTr" / f"liver_{n}.nii.gz", root / "labelsTr" / f"liver_{n}.nii.gz", n)
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS resource fork")  # as in the real archive
    (root / "dataset.json").write_text(json.dumps({
        "name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [{"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"}
                     for n in (0, 1, 10)]}), encoding="utf-8")
    cases = find_cases(root)
    assert [c.name for c in cases] == ["liver_0", "liver_1", "liver_10"]
    volume, labels = cases[2].load()
    assert volume.shape == labels.shape == (4, 6, 8) and labels.dtype == np.uint8 and labels.max() == 2


def test_lits_layout_across_batch_folders(tmp_path):
    for batch, numbers in (("Training Batch 1", (0, 2)), ("Training Batch 2", (11,))):
        folder = tmp_path / batch
        folder.mkdir()
        for n in numbers:
            _pair(folder / f"volume-{n}.nii", folder / f"segmentation-{n}.nii", n)
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["lits-0", "lits-2", "lits-11"]
    assert all(c.label_path is not None for c in cases)


def test_phantom_folder_and_mismatched_labels(tmp_path):
    _pair(tmp_path / "ct_000.nii.gz", tmp_path / "ct_000_label.nii.gz", 0)
    _pair(tmp_path / "ct_001.nii.gz", tmp_path / "ct_001_label.nii.gz", 1, shape=(4, 6, 8))
    write_image(np.zeros((4, 6, 9), np.uint8), tmp_path / "ct_001_label.nii.gz")  # wrong shape
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["ct_000", "ct_001"]
    cases[0].load()
    with pytest.raises(TransferSegError, match="label map .* has shape"):
        cases[1].load()


def test_empty_folder_explains_the_layouts(tmp_path):
    with pytest.raises(TransferSegError, match="Medical Segmentation Decathlon"):
        find_cases(tmp_path)
    with pytest.raises(TransferSegError, match="no such data folder"):
        find_cases(tmp_path / "missing")


def test_split_is_seeded_and_disjoint():
    items = list(range(10))
    train, val = split_cases(items, 0.3, seed=4)
    assert sorted(train + val) == items and len(val) == 3
    assert split_cases(items, 0.3, seed=4) == (train, val)
    assert split_cases([1, 2], 0.01, seed=0)[1]  # at least one validation case
