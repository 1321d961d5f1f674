"""The trainer: learning, frozen groups, per-group learning rates, loss switches, schedules, patch
sampling and augmentation, resumable checkpoints (a real SIGKILL), torchrun/DDP equivalence,
config errors.

Every network here is TinyNet (two convolutions, 4 channels, registered below as
"tiny_test_net"); the subprocess runs import this file (``architecture.module``) to register it.
It has no normalisation layer by default, so a 2-process DDP run (each process normalising its
own half of the batch) must equal a 1-process run; ``norm="batch"`` is for the freeze_bn test.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from TransferSegLib.datasets import Case
from TransferSegLib.nets import register
from TransferSegLib.progress import CancelToken, Cancelled
from TransferSegLib.training import (PatchSampler, PlateauTracker, TrainingCase, network_from_config, learning_rate_factor,
                                     load_config, main, rotations90, train, validate_config)
from TransferSegLib.training.sampling import elastic_displacement, load_case
from TransferSegLib.volume import TransferSegError, Volume

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DELAY_ENV = "TRANSFERSEG_TEST_STEP_DELAY"


@register("tiny_test_net")
class TinyNet(nn.Module):
    """conv 3×3×3 (encoder) → ReLU → conv 1×1×1 (decoder); "batch" adds a BatchNorm to the encoder."""

    def __init__(self, channels: int = 4, out_channels: int = 2, norm: str = "none", size_multiple=(1, 1, 1)):
        super().__init__()
        layers = [nn.Conv3d(1, channels, 3, padding=1)] + ([nn.BatchNorm3d(channels)] if norm == "batch" else [])
        self.encoder = nn.Sequential(*layers)
        self.decoder = nn.Conv3d(channels, out_channels, 1)
        self.size_multiple = tuple(size_multiple)

    def parameter_groups(self):
        return {"encoder": list(self.encoder.parameters()), "decoder": list(self.decoder.parameters())}

    def forward(self, x):
        if self.training and os.environ.get(DELAY_ENV):  # slows the subprocess down so a kill lands mid-run
            time.sleep(float(os.environ[DELAY_ENV]))
        return self.decoder(torch.relu(self.encoder(x)))


def blobs(seed: int, shape=(16, 32, 32), count=3, noise=0.3):
    """(Volume, labels): ellipsoid blobs of label 1, image = label + Gaussian noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for _ in range(count):
        c = [rng.uniform(3, s - 3) for s in shape]
        labels[((k - c[0]) / 2.5) ** 2 + ((j - c[1]) / 4) ** 2 + ((i - c[2]) / 4) ** 2 < 1] = 1
    image = labels + rng.normal(0, noise, shape).astype(np.float32)
    return Volume.from_ijk_to_ras(image.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), labels


def blob_cases(n=3, seed=0):
    return [Case(f"blobs-{seed + s}", _make=(lambda s=s: blobs(seed + s))) for s in range(n)]


def config(**overrides) -> dict:
    base = {
        "name": "tiny", "seed": 3,
        "architecture": {"name": "tiny_test_net", "config": {"channels": 4}, "module": "test_training"},
        "labels": [{"name": "blob", "label": 1, "color": [1.0, 0.5, 0.0]}],
        "data": {"root": "unused-when-cases-are-given"},
        "validation": {"fraction": 0.34},
        "patch_size": [8, 16, 16], "batch_size": 2, "positive_fraction": 0.7,
        "stages": [{"name": "all", "steps": 6, "optimizer": {"name": "adam", "lr": 0.01}, "loss": {"name": "ce"}}],
        "checkpoint_every": 100, "threads": 1, "progress_bar": False,
    }
    base.update(overrides)
    return base


def read_log(out: Path) -> list:
    with open(out / "log.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def files_under(out: Path) -> list:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def write_case_folder(folder: Path, n=3) -> Path:
    """TransferSeg phantom layout (ct_NNN.nii.gz + ct_NNN_label.nii.gz) for the subprocess runs:
    int16 "HU" images (label · 100 + noise), read back through io.load_volume."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        volume, labels = blobs(s)
        hu = np.round(volume.array * 100).astype(np.int16)
        for array, name in ((hu, f"ct_{s:03d}.nii.gz"), (labels, f"ct_{s:03d}_label.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(image, str(folder / name))
    return folder


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "Testing"), str(ROOT)]), OMP_NUM_THREADS="1")
    env.pop(DELAY_ENV, None)
    env.update(extra)
    return env


# --- learning, outputs, the model card --------------------------------------------------------------
def test_loss_decreases_and_the_run_writes_a_loadable_model(tmp_path):
    from TransferSegLib.models import load_model

    cfg = config(stages=[{"name": "all", "steps": 50, "optimizer": {"name": "adam", "lr": 0.03},
                          "loss": {"name": "ce"}}],
                 augmentation={"flip_axes": [1, 2], "rot90_axes": [[1, 2]], "rotate_deg": 10, "scale": [0.9, 1.1]},
                 validation={"fraction": 0.34, "every": 25}, checkpoint_every=20, preprocessing={})
    reports = []
    result = train(cfg, tmp_path / "run", progress=lambda f, s: reports.append((f, s)), cases=blob_cases())
    rows = read_log(tmp_path / "run")
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 50 and result.finished and result.steps == 50
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    # validation Dice at steps 25 and 50 (sliding-window inferer), and in the card
    assert [r["step"] for r in rows if r["val_dice_blob"]] == ["25", "50"]
    assert result.metrics["validation_dice"]["blob"] > 0.6
    assert result.metrics["validation_cases"] == 1
    card = json.loads(result.card_path.read_text(encoding="utf-8"))
    assert card["architecture"]["name"] == "tiny_test_net" and card["patch_size"] == [8, 16, 16]
    assert card["labels"][0]["name"] == "blob" and card["training"]["steps"] == 50
    assert card["training"]["data"] == {"cases": ["blobs-0", "blobs-1", "blobs-2"]}
    assert card["metrics"]["validation_dice"]["blob"] == result.metrics["validation_dice"]["blob"]
    loaded = load_model(result.card_path)
    saved = load_file(str(tmp_path / "run" / "checkpoint-00000050" / "weights.safetensors"))
    assert all(torch.equal(loaded.network.state_dict()[k], v) for k, v in saved.items())
    # progress: non-decreasing, ends at 1.0; files: atomic (no leftovers), no pickle
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    names = files_under(tmp_path / "run")
    assert not [n for n in names if ".partial" in n]
    assert {Path(n).suffix for n in names} <= {".csv", ".png", ".json", ".safetensors"}
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert names.count("checkpoint.json") == 1 and len([n for n in names if n.endswith("weights.safetensors")]) == 1
    # running it again does nothing: the run has finished
    again = train(cfg, tmp_path / "run", cases=blob_cases())
    assert again.card_path == result.card_path and read_log(tmp_path / "run") == rows
    # init_weights: a run that starts from the model and does not move (lr 0) ends with its weights
    cfg2 = config(name="tiny-init", init_weights=str(result.card_path.with_suffix(".safetensors")), validation={"fraction": 0.0},
                  stages=[{"steps": 1, "optimizer": {"name": "sgd", "lr": 0.0}, "loss": "ce"}])
    second = train(cfg2, tmp_path / "init", cases=blob_cases())
    weights = load_file(str(second.card_path.with_suffix(".safetensors")))
    assert all(torch.equal(weights[k], v) for k, v in saved.items())


# --- frozen groups, per-group learning rates, schedules -------------------------------------------
def test_frozen_group_stays_byte_identical_and_group_lrs_reach_the_optimizer(tmp_path):
    cfg = config(stages=[
        {"name": "decoder", "steps": 8, "frozen": ["encoder"], "group_lr": {"decoder": 0.005},
         "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8}, "schedule": {"name": "poly", "power": 0.9},
         "loss": {"name": "ce"}},
        {"name": "joint", "steps": 8, "group_lr": {"decoder": 0.01},
         "optimizer": {"name": "sgd", "lr": 0.002, "momentum": 0.9}, "schedule": {"name": "step", "step_size": 3, "gamma": 0.1},
         "loss": {"name": "ce"}}], validation={"fraction": 0.0}, checkpoint_every=4)
    initial = {k: v.clone() for k, v in network_from_config(validate_config(cfg), "cpu")[0].state_dict().items()}
    out = tmp_path / "run"
    first = train(cfg, out, cases=blob_cases(), max_steps=8)  # stops after the decoder stage
    assert first.steps == 8 and not first.finished and first.card_path is None
    after = load_file(str(out / "checkpoint-00000008" / "weights.safetensors"))
    for key in ("encoder.0.weight", "encoder.0.bias"):
        assert after[key].numpy().tobytes() == initial[key].numpy().tobytes()
    for key in ("decoder.weight", "decoder.bias"):
        assert not torch.equal(after[key], initial[key])
    result = train(cfg, out, cases=blob_cases())  # resumes into the joint stage
    assert result.finished and result.resumed_from == 8
    final = load_file(str(result.card_path.with_suffix(".safetensors")))
    assert not torch.equal(final["encoder.0.weight"], initial["encoder.0.weight"])

    rows = read_log(out)
    # stage 1: only the decoder is in the optimizer, at its group lr with the poly schedule
    for t in (0, 3, 7):
        assert rows[t]["lr_encoder"] == ""
        assert float(rows[t]["lr_decoder"]) == pytest.approx(0.005 * (1 - t / 8) ** 0.9, rel=1e-12)
    # stage 2: encoder at the optimizer's lr, decoder at its own, both with the step schedule
    for t in (0, 2, 3, 6, 7):
        row = rows[8 + t]
        assert float(row["lr_encoder"]) == pytest.approx(0.002 * 0.1 ** (t // 3), rel=1e-12)
        assert float(row["lr_decoder"]) == pytest.approx(0.01 * 0.1 ** (t // 3), rel=1e-12)
    assert [r["stage_name"] for r in rows] == ["decoder"] * 8 + ["joint"] * 8


def test_schedule_formulas():
    poly = {"name": "poly", "power": 0.9}
    for t in (0, 1, 50, 99):
        assert learning_rate_factor(poly, t, 100) == pytest.approx((1 - t / 100) ** 0.9)
    step = {"name": "step", "step_size": 50, "gamma": 0.1}
    assert [learning_rate_factor(step, t, 200) for t in (0, 49, 50, 99, 100, 199)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.001])
    assert learning_rate_factor({"name": "constant"}, 7, 10) == 1.0


def test_freeze_bn_keeps_frozen_batchnorm_statistics(tmp_path):
    def run(freeze_bn, out):
        cfg = config(architecture={"name": "tiny_test_net", "config": {"norm": "batch"}, "module": "test_training"},
                     stages=[{"steps": 3, "frozen": ["encoder"], "freeze_bn": freeze_bn,
                              "optimizer": {"name": "adam", "lr": 0.01}, "loss": "ce"}],
                     validation={"fraction": 0.0})
        train(cfg, out, cases=blob_cases(), max_steps=3)
        return load_file(str(out / "checkpoint-00000003" / "weights.safetensors"))

    kept, updated = run(True, tmp_path / "frozen"), run(False, tmp_path / "free")
    assert torch.equal(kept["encoder.1.running_mean"], torch.zeros(4))
    assert torch.equal(kept["encoder.1.running_var"], torch.ones(4))
    assert not torch.equal(updated["encoder.1.running_mean"], torch.zeros(4))
    assert torch.equal(kept["encoder.1.weight"], updated["encoder.1.weight"])  # frozen either way


# --- loss switches ---------------------------------------------------------------------------------
def test_loss_switches_at_a_step_an_epoch_and_on_a_plateau(tmp_path):
    stages = [
        {"name": "at-step", "steps": 5, "optimizer": {"name": "adam", "lr": 0.01},
         "loss": {"name": "ce", "switch": {"to": "focal", "at_step": 2}}},
        {"name": "at-epoch", "steps": 5, "optimizer": {"name": "adam", "lr": 0.01},
         "loss": {"name": "ce", "switch": {"to": {"name": "focal", "gamma": 1.0}, "at_epoch": 2}}},
        # lr 0: the loss cannot improve by min_delta, so the plateau is reached after `patience` steps
        {"name": "plateau", "steps": 7, "optimizer": {"name": "sgd", "lr": 0.0},
         "loss": {"name": "dice", "switch": {"to": "ce+dice", "on_plateau": {"patience": 3, "min_delta": 10.0}}}},
    ]
    cfg = config(stages=stages, steps_per_epoch=2, validation={"fraction": 0.0})
    train(cfg, tmp_path / "whole", cases=blob_cases())
    names = [r["loss_name"] for r in read_log(tmp_path / "whole")]
    assert names == ["ce"] * 2 + ["focal"] * 3 + ["ce"] * 4 + ["focal"] + ["dice"] * 4 + ["ce+dice"] * 3
    # interrupted inside the plateau count (after 2 of its 3 steps) and resumed: the tracker's
    # state travels in the checkpoint, so the switch happens at the same step with the same losses
    train(cfg, tmp_path / "split", cases=blob_cases(), max_steps=12)
    train(cfg, tmp_path / "split", cases=blob_cases())
    assert [r["loss"] for r in read_log(tmp_path / "split")] == [r["loss"] for r in read_log(tmp_path / "whole")]
    assert [r["loss_name"] for r in read_log(tmp_path / "split")] == names


def test_plateau_tracker():
    tracker = PlateauTracker(patience=2, min_delta=0.01)
    fired = [tracker.update(v) for v in [1.0, 0.9, 0.895, 0.899, 0.85, 0.849, 0.848]]
    assert fired == [False, False, False, True, False, False, True]
    windowed = PlateauTracker(patience=1, min_delta=0.0, window=2)
    # means of the last two: -, 1.5, 1.5 (no improvement → fires)
    assert [windowed.update(v) for v in [1.0, 2.0, 1.0]] == [False, False, True]


# --- patches and augmentation -------------------------------------------------------------------------
def sampler_for(cases, **overrides):
    cfg = validate_config(config(**overrides))
    return PatchSampler(cases, cfg)


def training_case(image, target):
    flat = np.flatnonzero(target > 0)
    return TrainingCase("case", image.astype(np.float32), target, float(image.min()), flat)


def test_positive_fraction_with_a_tiny_lesion_in_a_big_volume():
    target = np.zeros((32, 64, 64), np.uint8)
    target[20:22, 40:42, 10:12] = 1  # 8 voxels: a random 8×16×16 patch contains it ~4 % of the time
    case = training_case(np.zeros(target.shape), target)

    def share(fraction, **aug):
        sampler = sampler_for([case], positive_fraction=fraction, augmentation=aug)
        return np.mean([sampler.item(step, 0)[1].any() for step in range(1000)])

    assert 0.66 < share(0.7) < 0.76
    assert 0.66 < share(0.7, flip_axes=[0, 1, 2], rot90_axes=[[1, 2]]) < 0.76
    assert share(0.0) < 0.1
    assert share(1.0) == 1.0


def test_component_sampling_draws_every_connected_region_equally_often():
    """One 9,000-voxel object and one 18-voxel speck in a case, a 1,000-voxel object in another: per
    voxel the speck is almost never the centre; per region each of the three is a third of the draws."""
    big = np.zeros((32, 64, 64), np.uint8)
    big[10:20, 10:40, 10:40] = 1
    big[24:26, 50:53, 50:53] = 1
    other = np.zeros((32, 64, 64), np.uint8)
    other[12:22, 20:30, 20:30] = 1
    region_id = [np.where(big > 0, 0, -1), np.where(other > 0, 0, -1)]
    region_id[0][24:26, 50:53, 50:53] = 1
    region_id[1][other > 0] = 2
    cfg = config(positive_fraction=1.0, positive_jitter=0.0, patch_size=[4, 4, 4], augmentation={})

    def shares(sampling):
        c = validate_config(dict(cfg, positive_sampling=sampling))
        cases = [load_case(Case(f"c{n}"), c, (ids.astype(np.float32), t, (1.0, 1.0, 1.0)))
                 for n, (ids, t) in enumerate(zip(region_id, (big, other)))]
        sampler = PatchSampler(cases, c)
        centres = [int(sampler.item(step, 0)[0][2, 2, 2]) for step in range(900)]  # the patch's centre voxel
        return np.bincount(centres, minlength=3) / len(centres)

    by_voxel, by_region = shares("voxel"), shares("component")
    assert by_voxel[1] < 0.01 and 0.45 < by_voxel[2] < 0.55  # a case at a time, then a voxel: the speck is lost
    assert np.all(np.abs(by_region - 1 / 3) < 0.06), by_region
    assert validate_config(config())["positive_sampling"] == "voxel"  # the default is unchanged


def test_rotations90_group_sizes():
    assert len(rotations90([])) == 0
    assert len(rotations90([[1, 2]])) == 4
    assert len(rotations90([[0, 1], [1, 2]])) == 24
    assert len(rotations90([[0, 1], [0, 2], [1, 2]])) == 24
    cube = np.random.default_rng(0).random((3, 3, 3))
    rotated = set()
    for perm, flips in rotations90([[0, 1], [0, 2], [1, 2]]):
        r = np.transpose(cube, perm)
        r = np.flip(r, flips) if flips else r
        rotated.add(r.tobytes())
        # a proper rotation: the signed permutation matrix has determinant +1
        m = np.zeros((3, 3))
        for i, p in enumerate(perm):
            m[i, p] = -1 if i in flips else 1
        assert round(np.linalg.det(m)) == 1
    assert len(rotated) == 24


def test_augmentation_is_seeded_and_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(1)
    labels = (rng.random((24, 24, 24)) < 0.3).astype(np.uint8) * rng.integers(1, 3, (24, 24, 24)).astype(np.uint8)
    image = labels.astype(np.float32)  # the image is its label map
    aug = {"flip_axes": [0, 1, 2], "rot90_axes": [[0, 1], [0, 2], [1, 2]], "rotate_deg": 20.0,
           "rotate_axes": [[0, 1], [0, 2], [1, 2]], "scale": [0.8, 1.25], "probability": 1.0, "image_order": 0}
    case = TrainingCase("case", image, labels, 0.0, np.flatnonzero(labels))
    cfg = dict(patch_size=[12, 12, 12], augmentation=aug, labels=[{"name": "a", "label": 1}, {"name": "b", "label": 2}])
    sampler, same, other = sampler_for([case], **cfg), sampler_for([case], **cfg), sampler_for([case], seed=4, **cfg)
    plain = sampler_for([case], **dict(cfg, augmentation={}))
    changed = 0
    for step in range(40):
        img, lab = sampler.item(step, 1)
        assert img.shape == lab.shape == (12, 12, 12) and img.dtype == np.float32 and lab.dtype == np.uint8
        assert np.array_equal(img, lab.astype(np.float32))  # aligned, voxel for voxel
        img2, lab2 = same.item(step, 1)
        assert np.array_equal(img, img2) and np.array_equal(lab, lab2)  # same seed, same patch
        changed += not np.array_equal(img, plain.item(step, 1)[0])
        assert not np.array_equal(img, other.item(step, 1)[0])
    assert changed >= 38  # the augmentation did something
    # patches sampled by worker threads are the same patches
    threaded = PatchSampler([case], validate_config(config(**cfg)), workers=2)
    for a, b in zip(sampler.batch(7, range(4)), threaded.batch(7, range(4))):
        assert torch.equal(a, b)
    threaded.close()
    # linear interpolation of the image: still aligned in the sense that labels are its nearest values
    lin = sampler_for([case], **dict(cfg, augmentation=dict(aug, image_order=1)))
    img, lab = lin.item(0, 0)
    assert np.corrcoef(img.ravel(), lab.ravel())[0, 1] > 0.6


def test_elastic_displacement_is_smooth_bounded_and_per_axis():
    rng = np.random.default_rng(3)
    field = elastic_displacement(rng, (12, 40, 40), [0.0, 1.6, 1.6], [6.0, 10.0, 10.0])
    assert field.shape == (3, 12, 40, 40)
    assert np.all(field[0] == 0.0)  # no move along an axis with magnitude 0
    assert 0.3 < field[1].std() < 1.6 and np.abs(field[1:]).max() <= 3 * 1.6  # no overshoot past the clip
    # smooth: neighbouring voxels move almost together (control points 10 voxels apart)
    assert np.abs(np.diff(field[1], axis=2)).max() < 1.0
    # no fold: along each axis the moved coordinate keeps increasing
    assert np.all(np.diff(np.arange(40)[None, None, :] + field[2], axis=2) > 0)
    assert np.all(np.diff(np.arange(40)[None, :, None] + field[1], axis=1) > 0)


def test_elastic_deformation_keeps_image_and_labels_aligned_and_draws_the_rest_as_before():
    rng = np.random.default_rng(2)
    labels = np.zeros((16, 48, 48), np.uint8)
    labels[4:12, 10:30, 12:36] = 1
    labels[6:10, 30:40, 20:28] = 2
    image = labels.astype(np.float32)
    case = TrainingCase("case", image, labels, 0.0, np.flatnonzero(labels))
    aug = {"flip_axes": [1, 2], "rotate_deg": 15.0, "scale": [0.9, 1.1], "probability": 1.0, "image_order": 0}
    cfg = dict(patch_size=[8, 32, 32], augmentation=aug, labels=[{"name": "a", "label": 1}, {"name": "b", "label": 2}])
    plain = sampler_for([case], **cfg)
    zero = sampler_for([case], **dict(cfg, augmentation=dict(aug, elastic={"magnitude": [0, 0, 0], "spacing": [4, 8, 8]})))
    bent = sampler_for([case], **dict(cfg, augmentation=dict(aug, elastic={"magnitude": [0.6, 1.3, 1.3],
                                                                          "spacing": [4, 8, 8]})))
    moved = 0
    for step in range(12):
        a_img, a_lab = plain.item(step, 0)
        z_img, z_lab = zero.item(step, 0)
        # a zero displacement is the affine resampling, voxel for voxel
        assert np.array_equal(a_img, z_img) and np.array_equal(a_lab, z_lab)
        b_img, b_lab = bent.item(step, 0)
        assert np.array_equal(b_img, b_lab.astype(np.float32))  # image and labels moved together
        moved += int((b_lab != a_lab).sum())
        assert set(np.unique(b_lab)) <= {0, 1, 2}
    assert moved > 12 * 50  # the deformation moved the boundaries
    # the unaugmented sampler is unchanged by the option's existence: it equals a sampler without it
    again = sampler_for([case], **dict(cfg, augmentation=dict(aug, elastic=None)))
    assert np.array_equal(again.item(5, 1)[0], plain.item(5, 1)[0])


# --- checkpoints: a real kill -------------------------------------------------------------------------
def resume_config(data_root: Path) -> dict:
    return config(
        data={"root": str(data_root)}, validation={"fraction": 0.34}, checkpoint_every=5,
        preprocessing={"hu_window": [-100, 200]},
        augmentation={"flip_axes": [1, 2], "rot90_axes": [[1, 2]], "rotate_deg": 10, "scale": [0.9, 1.1]},
        stages=[
            {"name": "decoder", "steps": 12, "frozen": ["encoder"], "optimizer": {"name": "adam", "lr": 0.01},
             "schedule": {"name": "poly", "power": 0.9}, "loss": {"name": "ce", "switch": {"to": "focal", "at_step": 6}}},
            {"name": "joint", "steps": 12, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
             "schedule": {"name": "step", "step_size": 4, "gamma": 0.5},
             "loss": {"name": "ce", "switch": {"to": "focal", "on_plateau": {"patience": 4, "min_delta": 0.01}}}},
        ])


def test_sigkill_and_rerun_reproduces_the_uninterrupted_losses(tmp_path, capsys):
    data = write_case_folder(tmp_path / "data")
    cfg = resume_config(data)
    whole = train(cfg, tmp_path / "whole")
    assert whole.finished
    config_path = tmp_path / "train.json"
    config_path.write_text(json.dumps(cfg), encoding="utf-8")
    out = tmp_path / "killed"
    command = [PYTHON, "-m", "TransferSegLib.training", str(config_path), "--output", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(**{DELAY_ENV: "0.1"}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pointer, deadline = out / "checkpoint.json", time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text(encoding="utf-8"))["step"] >= 15:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = json.loads(pointer.read_text(encoding="utf-8"))["step"]
    assert 15 <= killed_at < 24 and not (out / "result.json").exists()

    rerun = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from step {killed_at}" in rerun.stdout
    resumed, reference = read_log(out), read_log(tmp_path / "whole")
    assert [r["step"] for r in resumed] == [str(s) for s in range(1, 25)]
    # bit-for-bit: the losses after the checkpoint, the loss names (focal after the switches) and lrs
    for key in ("loss", "loss_name", "lr_encoder", "lr_decoder", "val_dice_blob"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    final = load_file(str(out / "model" / "tiny.safetensors"))
    expected = load_file(str(tmp_path / "whole" / "model" / "tiny.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not [n for n in files_under(out) if ".partial" in n]
    # a rerun with another config in the same folder is refused, naming what changed
    config_path.write_text(json.dumps(dict(cfg, seed=99)), encoding="utf-8")
    assert main([str(config_path), "--output", str(out)]) == 2
    assert "differs in seed" in capsys.readouterr().err


def test_cancel_leaves_a_resumable_checkpoint(tmp_path):
    cfg = config(stages=[{"steps": 8, "optimizer": {"name": "adam", "lr": 0.01}, "loss": "ce"}],
                 validation={"fraction": 0.0}, checkpoint_every=2)
    train(cfg, tmp_path / "whole", cases=blob_cases())
    token = CancelToken()

    def progress(fraction, stage):
        if fraction >= 0.95 * 5 / 8:
            token.cancel()

    with pytest.raises(Cancelled):
        train(cfg, tmp_path / "cancelled", progress=progress, cancel=token, cases=blob_cases())
    assert json.loads((tmp_path / "cancelled" / "checkpoint.json").read_text(encoding="utf-8"))["step"] == 4
    result = train(cfg, tmp_path / "cancelled", cases=blob_cases())
    assert result.resumed_from == 4 and result.finished
    assert [r["loss"] for r in read_log(tmp_path / "cancelled")] == [r["loss"] for r in read_log(tmp_path / "whole")]


def test_rows_and_checkpoints_past_the_latest_checkpoint_are_dropped_on_resume(tmp_path):
    """A kill after log.csv (and part of a new checkpoint) was written, before checkpoint.json moved."""
    cfg = config(stages=[{"steps": 9, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "loss": "ce"}],
                 validation={"fraction": 0.0}, checkpoint_every=3, keep_checkpoints=2)
    train(cfg, tmp_path / "whole", cases=blob_cases())
    out = tmp_path / "run"
    train(cfg, out, cases=blob_cases(), max_steps=6)
    (out / "checkpoint.json").write_text(json.dumps({"latest": "checkpoint-00000003", "step": 3}), encoding="utf-8")
    (out / "checkpoint-00000006" / "state.json").unlink()  # the newer checkpoint was incomplete
    (out / ".log.partial-0badf00d.csv").write_text("a temporary file of the killed write", encoding="utf-8")
    assert len(read_log(out)) == 6
    result = train(cfg, out, cases=blob_cases())
    assert result.resumed_from == 3
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(tmp_path / "whole")]
    assert not [n for n in files_under(out) if ".partial" in n]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000006", "checkpoint-00000009"]


def test_a_kill_right_after_a_checkpoint_loses_no_log_rows(tmp_path, monkeypatch):
    import TransferSegLib.training.trainer as training

    cfg = config(stages=[{"steps": 8, "optimizer": {"name": "adam", "lr": 0.01}, "loss": "ce"}],
                 validation={"fraction": 0.0}, checkpoint_every=3)
    train(cfg, tmp_path / "whole", cases=blob_cases())
    real = training.save_checkpoint

    def save_then_die(out, step, *args):
        folder = real(out, step, *args)
        if step == 6:
            raise KeyboardInterrupt  # nothing after the checkpoint gets written
        return folder

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", cases=blob_cases())
    monkeypatch.undo()
    assert train(cfg, tmp_path / "run", cases=blob_cases()).resumed_from == 6
    assert [r["loss"] for r in read_log(tmp_path / "run")] == [r["loss"] for r in read_log(tmp_path / "whole")]


# --- torchrun / DistributedDataParallel -----------------------------------------------------------------
def test_torchrun_two_processes_match_one_process(tmp_path):
    """Norm-free TinyNet: with BatchNorm each rank would normalise its own half-batch and differ."""
    data = write_case_folder(tmp_path / "data")
    cfg = config(data={"root": str(data)}, batch_size=4, preprocessing={"hu_window": [-100, 200]}, validation={"fraction": 0.34}, checkpoint_every=4,
                 augmentation={"flip_axes": [2], "rotate_deg": 10},
                 stages=[{"name": "decoder", "steps": 4, "frozen": ["encoder"], "optimizer": {"name": "adam", "lr": 0.01},
                          "loss": {"name": "ce"}},
                         {"name": "joint", "steps": 4, "optimizer": {"name": "adam", "lr": 0.01},
                          "loss": {"name": "ce", "switch": {"to": "focal", "at_step": 2}}}])
    single = train(cfg, tmp_path / "one")
    config_path = tmp_path / "train.json"
    config_path.write_text(json.dumps(cfg), encoding="utf-8")
    torchrun = Path(PYTHON).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "TransferSegLib.training",
               str(config_path), "--output", str(tmp_path / "two")]
    run = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, encoding="utf-8", timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 8
    diffs = [abs(float(a["loss"]) - float(b["loss"])) for a, b in zip(one, two)]
    assert max(diffs) < 1e-5, diffs
    print(f"DDP vs one process: max |loss difference| {max(diffs):.3g}")
    assert [a["loss_name"] for a in one] == [b["loss_name"] for b in two]
    w1 = load_file(str(single.card_path.with_suffix(".safetensors")))
    w2 = load_file(str(tmp_path / "two" / "model" / "tiny.safetensors"))
    weight_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert weight_diff < 1e-5
    print(f"DDP vs one process: max |weight difference| {weight_diff:.3g}")
    card = json.loads((tmp_path / "two" / "model" / "tiny.json").read_text(encoding="utf-8"))
    assert card["training"]["processes"] == 2
    # only rank 0 wrote: the same files as the one-process run, no leftovers
    assert files_under(tmp_path / "two") == files_under(tmp_path / "one")


# --- heatmap regression (AH-Net DBT: L2, then the focal L2 loss) ---------------------------------------
def test_heatmap_task_trains_with_l2_then_focal_l2(tmp_path):
    def heat(seed):
        volume, labels = blobs(seed)
        return volume, labels.astype(np.float32) * 10.0  # scaled so that errors exceed 1 (eq. 4's domain)

    cases = [Case(f"h{s}", _make=(lambda s=s: heat(s))) for s in range(2)]
    cfg = config(task="heatmap", architecture={"name": "tiny_test_net", "config": {"out_channels": 1},
                                               "module": "test_training"},
                 labels=[{"name": "lesion", "label": 1}], validation={"fraction": 0.0}, positive_threshold=5.0,
                 stages=[{"steps": 6, "optimizer": {"name": "adam", "lr": 0.01},
                          "loss": {"name": "l2", "switch": {"to": {"name": "focal_l2", "d_max": 100.0}, "at_step": 3}}}])
    result = train(cfg, tmp_path / "run", cases=cases)
    rows = read_log(tmp_path / "run")
    assert [r["loss_name"] for r in rows] == ["l2"] * 3 + ["focal_l2"] * 3
    assert result.finished and json.loads(result.card_path.read_text(encoding="utf-8"))["inference"]["activation"] == "none"


# --- config errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, key", [
    (lambda c: c.pop("stages"), "stages"),
    (lambda c: c.update(epochs=3), "epochs"),
    (lambda c: c["stages"][0]["optimizer"].update(name="adamw"), "stages[0].optimizer.name"),
    (lambda c: c["stages"][0]["optimizer"].update(momentum=0.9), "stages[0].optimizer.momentum"),
    (lambda c: c["stages"][0].update(schedule={"name": "poly"}), "stages[0].schedule.power"),
    (lambda c: c["stages"][0].update(loss={"name": "ce", "switch": {"to": "hinge", "at_step": 2}}),
     "stages[0].loss.switch.to.name"),
    (lambda c: c["stages"][0].update(loss={"name": "ce", "switch": {"to": "focal"}}), "stages[0].loss.switch"),
    (lambda c: c["stages"][0].update(loss={"name": "focal", "gama": 2}), "stages[0].loss"),
    (lambda c: c["stages"][0].update(steps=0), "stages[0].steps"),
    (lambda c: c.update(patch_size=[8, 16]), "patch_size"),
    (lambda c: c.update(augmentation={"rot90_axes": [[0, 1]]}), "augmentation.rot90_axes[0]"),
    (lambda c: c.update(augmentation={"flip_axes": [3]}), "augmentation.flip_axes[0]"),
    (lambda c: c.update(augmentation={"elastic": {"magnitude": [1, 3, 3]}}), "augmentation.elastic.spacing"),
    (lambda c: c.update(augmentation={"elastic": {"magnitude": [1, 5, 3], "spacing": [8, 24, 24]}}),
     "augmentation.elastic.magnitude[1]"),
    (lambda c: c.update(augmentation={"elastic": [1, 3, 3]}), "augmentation.elastic"),
    (lambda c: c.update(labels=[{"name": "a", "label": 2}]), "labels"),
    (lambda c: c.update(batch_size=0), "batch_size"),
    (lambda c: c.update(positive_fraction=1.5), "positive_fraction"),
    (lambda c: c.update(positive_sampling="lesion"), "positive_sampling"),
    (lambda c: c.update(data={"phantom": "mri", "count": 2}), "data.phantom"),
    (lambda c: c.update(preprocessing={"hu_window": [100, -100]}), "preprocessing"),
])
def test_config_errors_name_the_key(change, key):
    cfg = config()
    change(cfg)
    with pytest.raises(TransferSegError) as error:
        validate_config(cfg)
    assert f"training config: {key}" in str(error.value)


def test_errors_found_when_the_network_is_built(tmp_path):
    cases = blob_cases(2)
    bad_group = config(stages=[{"steps": 1, "frozen": ["encodr"], "optimizer": {"name": "adam", "lr": 0.1}, "loss": "ce"}])
    with pytest.raises(TransferSegError, match=r"stages\[0\]\.frozen.*'encodr'.*encoder, decoder"):
        train(bad_group, tmp_path / "a", cases=cases)
    multiple = config(architecture={"name": "tiny_test_net", "config": {"size_multiple": [1, 32, 32]}})
    with pytest.raises(TransferSegError, match=r"patch_size.*multiple of \[1, 32, 32\]"):
        train(multiple, tmp_path / "b", cases=cases)
    channels = config(labels=[{"name": "a", "label": 1}, {"name": "b", "label": 2}])
    with pytest.raises(TransferSegError, match="architecture.config.*2 output channels.*need 3"):
        train(channels, tmp_path / "c", cases=cases)
    with pytest.raises(TransferSegError, match="architecture.module"):
        train(config(architecture={"name": "x", "module": "no_such_module_here"}), tmp_path / "d", cases=cases)


def test_load_config_resolves_paths_and_reports_bad_json(tmp_path):
    (tmp_path / "bad.json").write_text('{"name": "x",\n "seed": }', encoding="utf-8")
    with pytest.raises(TransferSegError, match="line 2"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.json").write_text(json.dumps(config(data={"root": "../data"})), encoding="utf-8")
    assert load_config(tmp_path / "conf" / "c.json")["data"]["root"] == str((tmp_path / "data").resolve())


def test_shipped_example_configs_are_valid():
    paths = sorted((ROOT / "Resources" / "configs").glob("*.json"))
    assert paths
    for path in paths:
        load_config(path)


def test_no_pickle_in_the_trainer():
    for name in ("training/trainer.py", "training/recipes.py", "losses.py", "views.py", "fusion.py"):
        source = (ROOT / "TransferSegLib" / name).read_text(encoding="utf-8")
        for forbidden in ("torch.load", "torch.save", "import pickle", "pickle."):
            assert forbidden not in source, (name, forbidden)
