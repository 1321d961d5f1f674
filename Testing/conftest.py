"""Shared helpers for the test suite: small images written by SimpleITK with chosen geometry."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation
from torch import nn

# LPS direction matrices (row-major 3×3) for the geometry cases every writer must keep.
DIRECTIONS_LPS = {
    "identity": np.eye(3),
    "oblique": Rotation.from_euler("xyz", [12.0, -21.0, 33.0], degrees=True).as_matrix(),
    "ras_flipped": np.diag([-1.0, -1.0, 1.0]),
    "coronal_acquired": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}


def write_image(array, path, spacing_ijk=(0.71, 0.83, 3.3), origin_lps=(-12.5, 33.25, 101.1),
                direction_lps=np.eye(3), compress=True):
    """Write ``array`` (axes (k, j, i)) with SimpleITK and the given ITK (LPS) geometry."""
    image = sitk.GetImageFromArray(np.asarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing_ijk))
    image.SetOrigin(tuple(float(o) for o in origin_lps))
    image.SetDirection(tuple(np.asarray(direction_lps, dtype=float).ravel()))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return Path(path)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_dicom_series(array, folder, spacing_ijk=(1.5, 1.5, 4.0), origin_lps=(0.0, 0.0, 0.0)) -> Path:
    """Write ``array`` (axes (k, j, i), int16) into ``folder`` as a CT DICOM series, one slice per file,
    with the tags a reader groups and orders a series by, as a scanner writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.asarray(array, np.int16))
    image.SetSpacing(tuple(float(s) for s in spacing_ijk))
    image.SetOrigin(tuple(float(o) for o in origin_lps))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4241",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.4242", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing_ijk[2]), "0028|1052": "0", "0028|1053": "1",
        }.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(slice_k)
    return folder


@pytest.fixture
def ct_like():
    """A small int16 CT-like array (HU) with a bright blob, axes (k, j, i)."""
    rng = np.random.default_rng(7)
    array = rng.normal(40, 15, size=(6, 10, 12)).round().astype(np.int16)
    array[2:4, 3:7, 4:9] = 300
    array[0, 0, 0] = -1000
    return array


LIVER_TUMOR_SEGMENTS = [
    {"name": "liver", "label": 1, "color": [0.85, 0.45, 0.35],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}},
    {"name": "liver tumor", "label": 2, "color": [0.2, 0.9, 0.3]},
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A real (untrained, seeded) small 3D U-Net saved as safetensors + card: the engine's test model."""
    import torch

    from TransferSegLib.models import save_model
    from TransferSegLib.nets import build_network

    torch.manual_seed(1)
    config = {"in_channels": 1, "out_channels": 3, "base_channels": 4, "levels": 2}
    card = {"name": "tiny-unet3d", "version": "0.0.1", "task": "segmentation", "labels": LIVER_TUMOR_SEGMENTS,
            "architecture": {"name": "unet3d", "config": config}, "preprocessing": {"hu_window": [-200, 250]},
            "patch_size": [8, 32, 32], "inference": {"overlap": 0.25},
            "evaluation": {"regions": {"liver": [1, 2], "liver tumor": [2]}}}
    return save_model(build_network("unet3d", config), card, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_heatmap_model(tmp_path_factory):
    """A real (untrained, seeded) small 3D U-Net for the heatmap task: the engine's detection test model."""
    from TransferSegLib.models import save_model
    from TransferSegLib.nets import build_network

    torch.manual_seed(2)
    config = {"in_channels": 1, "out_channels": 1, "base_channels": 4, "levels": 2}
    card = {"name": "tiny-heatmap", "version": "0.0.1", "task": "heatmap",
            "labels": [{"name": "lesion", "label": 1, "color": [1.0, 0.8, 0.1]}],
            "architecture": {"name": "unet3d", "config": config}, "preprocessing": {"normalise": "minmax"},
            "patch_size": [8, 32, 32], "inference": {"overlap": 0.25, "activation": "sigmoid"},
            "peaks": {"threshold": 0.0, "min_distance": [2, 6, 6], "max_peaks": 5}}
    return save_model(build_network("unet3d", config), card, tmp_path_factory.mktemp("heatmap_models"))


def save_tiny_mass_ahnet(folder):
    """A small untrained 3D AH-Net saved as a DBT mass heatmap model (a ``masses`` component) on the
    1 × 0.5 × 0.5 mm working grid; returns its card path."""
    from TransferSegLib.models import save_model
    from TransferSegLib.nets import build_network

    torch.manual_seed(0)
    ahnet = {"in_channels": 1, "out_channels": 1, "backbone": "resnet18", "stem_slices": 3, "growth_rate": 4,
             "dense_layers": 1, "bottleneck_factor": 2, "psp_sizes": [4, 2]}
    return save_model(build_network("ahnet", ahnet),
                      {"name": "masses-test", "version": "1.0.0", "task": "heatmap", "labels": [{"name": "mass", "label": 1}],
                       "architecture": {"name": "ahnet", "config": ahnet}, "preprocessing": {"normalise": "minmax"},
                       "patch_size": [16, 64, 64], "working_spacing_mm": [1.0, 0.5, 0.5],
                       "peaks": {"threshold": 0.25, "min_distance": [3, 10, 10], "max_peaks": 20},
                       "inference": {"activation": "none", "overlap": 0.25}}, folder)


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))  # signed: BN must not commute with max
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def tiny_multiview_recipe(**changes) -> dict:
    """The shipped multiview recipe (Resources/configs/ct-liver-tumor-vfn.json) shrunk to seconds:
    4 small phantoms, tiny view networks and VFN, 2 steps each."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "Resources" / "configs" / "ct-liver-tumor-vfn.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["data"] = {"phantom": "ct", "count": 4, "seed": 1000, "options": {"shape": [24, 48, 48]}}
    config["views"]["architecture"]["config"].update(base_channels=4, levels=3)
    config["views"]["patch_size"] = [4, 32, 32]
    config["views"]["stages"][0]["steps"] = 2
    config["fusion"]["architecture"]["config"]["channels"] = [4, 4, 8]
    config["fusion"]["patch_size"] = [16, 16, 16]
    config["fusion"]["stages"][0]["steps"] = 2
    config["fusion_data"] = {"split": 0.5, "roi_margin": 4}
    config["threads"] = 1
    config.update(changes)
    return config
