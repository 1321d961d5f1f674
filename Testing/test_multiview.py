"""Multi-view segmentation: anatomical views, the 2D networks run over every slice, the VFN, the
multiview recipe (split and cross-cross-augmentation), the ``multiview`` method and its outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LIVER_TUMOR_SEGMENTS, randomize_bn, tiny_multiview_recipe
from TransferSegLib.fusion import fusion_input, majority_vote
from TransferSegLib.nets import VFN, build_network
from TransferSegLib.views import VIEWS, directions_of, from_view, predict_view, to_view, view_permutation
from TransferSegLib.volume import TransferSegError, Volume

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SMALL_2D = {"in_channels": 3, "out_channels": 3, "base_channels": 4, "levels": 3, "norm": "batch"}


def _net2d(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(build_network("unet2d_multislice", SMALL_2D), seed=seed).eval()


# --- views --------------------------------------------------------------------------------------
def test_view_axes_come_from_the_direction_matrix_not_the_axis_index():
    lps = directions_of("LPS")
    assert np.array_equal(lps, np.diag([-1.0, -1.0, 1.0]))
    assert view_permutation(lps, "axial") == (0, 1, 2)
    assert view_permutation(lps, "coronal") == (1, 0, 2)
    assert view_permutation(lps, "sagittal") == (2, 0, 1)
    # stored as sagittal slices: array axis 0 (k) runs along R, j along S, i along A
    sagittal_stored = np.zeros((3, 3))
    sagittal_stored[1, 0] = 1  # i -> A
    sagittal_stored[2, 1] = -1  # j -> I
    sagittal_stored[0, 2] = 1  # k -> R
    assert view_permutation(sagittal_stored, "sagittal") == (0, 1, 2)  # slices along k, rows S (j), columns A (i)
    assert view_permutation(sagittal_stored, "axial") == (1, 2, 0)  # normal S = j; rows A = i; columns R = k
    with pytest.raises(TransferSegError, match="a view is one of axial, coronal, sagittal"):
        view_permutation(lps, "oblique")
    with pytest.raises(TransferSegError, match="three letters"):
        directions_of("LPX")


def test_to_view_and_back_is_the_identity_with_and_without_channels():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    for view in VIEWS:
        perm = view_permutation(directions_of("LPS"), view)
        assert np.array_equal(from_view(to_view(a, perm), perm), a)
        assert np.array_equal(from_view(to_view(a[0], perm), perm), a[0])
    coronal = to_view(a[0], view_permutation(directions_of("LPS"), "coronal"))
    assert coronal.shape == (4, 3, 5) and np.array_equal(coronal[2], a[0][:, 2, :])  # slice j = 2: (k, i)


def test_predict_view_equals_the_slice_stack_network_on_the_whole_view():
    """Batched slice by slice (with a batch that does not divide the slices) = the network on the stack."""
    net = _net2d()
    rng = np.random.default_rng(0)
    image = rng.random((12, 16, 20), dtype=np.float32)
    for view in VIEWS:
        perm = view_permutation(directions_of("LPS"), view)
        got = predict_view(net, image, directions_of("LPS"), view, num_classes=3, batch_size=5)
        with torch.no_grad():
            stack = torch.from_numpy(np.ascontiguousarray(to_view(image, perm)))[None, None]
            expected = torch.softmax(net(stack), dim=1)[0].numpy()
        expected = from_view(np.round(expected * 255).astype(np.uint8), perm)
        assert got.shape == (3, 12, 16, 20) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, view


def test_predict_view_pads_slices_to_the_network_multiple_and_crops_back():
    net = _net2d()
    image = np.random.default_rng(1).random((5, 13, 18), dtype=np.float32)
    got = predict_view(net, image, directions_of("LPS"), "axial", num_classes=3)
    padded = np.pad(image, ((0, 0), (0, 3), (0, 2)), mode="edge")  # to multiples of 4
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(padded)[None, None]), dim=1)[0, :, :, :13, :18].numpy()
    assert np.abs(got.astype(int) - np.round(expected * 255).astype(int)).max() <= 1
    assert np.all(np.abs(got.astype(int).sum(axis=0) - 255) <= 3)
    with pytest.raises(TransferSegError, match="labels need 4"):
        predict_view(net, image, directions_of("LPS"), "axial", num_classes=4)
    with pytest.raises(TransferSegError, match="3D volume"):
        predict_view(net, image[0], directions_of("LPS"), "axial", num_classes=3)


def test_a_sagittally_stored_volume_gives_the_same_axial_view_prediction():
    """The views are anatomical: the same image stored as sagittal slices (array axes permuted,
    direction matrix to match) gives the same axial-view prediction once the file order is undone."""
    net = _net2d(3)
    image = np.random.default_rng(2).random((10, 16, 12), dtype=np.float32)  # LPS axial: k=S, j=P, i=L
    lps = directions_of("LPS")
    stored = np.transpose(image, (2, 0, 1))  # k' = i (L), j' = k (S), i' = j (P)
    d = np.zeros((3, 3))
    d[:, 0] = lps[:, 1]  # i' runs along j
    d[:, 1] = lps[:, 2]  # j' runs along k
    d[:, 2] = lps[:, 0]  # k' runs along i
    plain = predict_view(net, image, lps, "axial", num_classes=3)
    other = predict_view(net, stored, d, "axial", num_classes=3)
    assert np.array_equal(np.transpose(other, (0, 2, 3, 1)), plain)
    # and the axis-index slicing (axis 0 of the file = "axial") would not
    wrong = predict_view(net, stored, lps, "axial", num_classes=3)
    assert not np.array_equal(np.transpose(wrong, (0, 2, 3, 1)), plain)


# --- VFN ----------------------------------------------------------------------------------------
def test_vfn_has_the_paper_layout_and_parameter_count():
    net = VFN()  # paper: 4 channels in (image + 3 views), 1 out
    conv = lambda cin, cout: 27 * cin * cout + 2 * cout  # 3×3×3 conv without bias + BatchNorm
    deconv = lambda cin, cout: 64 * cin * cout + 2 * cout  # 4×4×4 deconv without bias + BatchNorm
    expected = (conv(4, 16) + conv(16, 16) + conv(16, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64)
                + deconv(64, 64) + deconv(64, 32) + deconv(32, 4) + 2 * 4 + (4 + 1))
    assert sum(p.numel() for p in net.parameters()) == expected == 618069
    x = torch.rand(1, 4, 16, 24, 32)
    assert net.eval()(x).shape == (1, 1, 16, 24, 32)
    multi = build_network("vfn", {"in_channels": 7, "out_channels": 3})
    assert multi.eval()(torch.rand(2, 7, 8, 8, 8)).shape == (2, 3, 8, 8, 8)
    assert multi.config == {"in_channels": 7, "out_channels": 3, "channels": [16, 32, 64]}
    with pytest.raises(TransferSegError, match="multiples of 8"):
        net(torch.rand(1, 4, 16, 20, 32))
    with pytest.raises(TransferSegError, match=r"expects \(N, 4, D, H, W\)"):
        net(torch.rand(1, 3, 16, 16, 16))


def test_vfn_highway_carries_the_raw_input_to_the_output():
    """With every conv and deconv zeroed, only the raw-input highway reaches the head: the output is
    then a per-voxel function of the input (changing one voxel changes only that voxel)."""
    net = VFN(4, 1).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and m is not net.head[2]:
                m.weight.zero_()
        x = torch.rand(1, 4, 16, 16, 16)
        y0 = net(x)
        x[0, :, 5, 6, 7] += 1.0
        changed = (net(x) - y0).abs()[0, 0] > 1e-6
    assert changed[5, 6, 7] and changed.sum() == 1


def test_fusion_input_is_the_image_and_each_views_nested_probabilities():
    image = np.array([[[-0.5, 0.25, 2.0]]], np.float32)
    view = np.zeros((3, 1, 1, 3), np.uint8)
    view[:, 0, 0, 0] = (255, 0, 0)
    view[:, 0, 0, 1] = (51, 102, 102)
    view[:, 0, 0, 2] = (0, 0, 255)
    x = fusion_input(image, [view] * 3)
    assert x.shape == (7, 1, 1, 3) and x.dtype == np.float32
    assert np.allclose(x[0, 0, 0], [0.0, 0.25, 1.0])
    assert np.allclose(x[1, 0, 0], [0.0, 0.8, 1.0]) and np.allclose(x[2, 0, 0], [0.0, 0.4, 1.0])
    assert fusion_input(image, [view] * 3, include_image=False).shape == (6, 1, 1, 3)
    with pytest.raises(TransferSegError, match="needs three"):
        fusion_input(image, [view] * 2)


# --- trainer pieces -----------------------------------------------------------------------------
def test_multistep_schedule_divides_at_two_thirds_and_five_sixths():
    from TransferSegLib.training import learning_rate_factor

    schedule = {"name": "multistep", "milestones": [2 / 3, 5 / 6], "gamma": 0.1}
    factors = [learning_rate_factor(schedule, t, 30000) for t in (0, 19999, 20000, 24999, 25000, 29999)]
    assert np.allclose(factors, [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_stacks_train_with_every_channel_moving_with_the_target(tmp_path):
    """Multi-channel patches: 24 rotations and flips move the channels and the labels together."""
    from TransferSegLib.training import PatchSampler, validate_config, write_stack
    from TransferSegLib.training.sampling import cases_from_spec, load_case

    rng = np.random.default_rng(0)
    target = np.zeros((20, 24, 28), np.uint8)
    target[6:14, 8:18, 9:20] = 1
    target[9:11, 11:13, 12:15] = 2
    noise = rng.random(target.shape, dtype=np.float32)
    image = np.stack([noise, target / 2.0, (target > 0).astype(np.float32)])
    write_stack(tmp_path / "stacks" / "case-a.npz", image, target, (1.0, 1.0, 1.0))
    config = validate_config({
        "name": "vfn-test", "labels": LIVER_TUMOR_SEGMENTS, "architecture": {"name": "vfn", "config": {"in_channels": 2}},
        "data": {"stacks": str(tmp_path / "stacks"), "channels": [1, 2], "crop_to_foreground": 2},
        "patch_size": [8, 8, 8], "augmentation": {"rot90_axes": [[0, 1], [1, 2]], "flip_axes": [0, 1, 2],
                                                  "probability": 1.0},
        "stages": [{"steps": 1, "optimizer": {"name": "sgd", "lr": 0.01}, "loss": "dice"}]})
    (case,) = cases_from_spec(config["data"])
    loaded = load_case(case, config)
    assert loaded.image.shape == (2, 12, 14, 15) and loaded.target.shape == (12, 14, 15)  # box + 2 each side
    sampler = PatchSampler([loaded], config)
    for step in range(12):
        images, targets = sampler.batch(step, range(2))
        assert images.shape == (2, 2, 8, 8, 8) and targets.shape == (2, 8, 8, 8)
        assert torch.equal(images[:, 0] * 2, targets.float())
        assert torch.equal(images[:, 1], (targets > 0).float())
    with pytest.raises(TransferSegError, match="preprocessing"):
        validate_config(dict(config, preprocessing={"hu_window": [0, 1]}))


def test_a_view_config_needs_a_working_orientation():
    from TransferSegLib.training import validate_config

    base = {"name": "v", "labels": LIVER_TUMOR_SEGMENTS, "architecture": {"name": "unet2d_multislice"},
            "data": {"phantom": "ct", "count": 2}, "patch_size": [4, 32, 32], "view": "coronal",
            "stages": [{"steps": 1, "optimizer": {"name": "adam", "lr": 0.001}, "loss": "ce"}]}
    with pytest.raises(TransferSegError, match="working_orientation"):
        validate_config(base)
    with pytest.raises(TransferSegError, match="view: must be null or one of"):
        validate_config(dict(base, view="top", working_orientation="LPS"))
    assert validate_config(dict(base, working_orientation="LPS"))["view"] == "coronal"


# --- the recipe and the method ------------------------------------------------------------------
def _recipe(tmp_path, **changes) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(tiny_multiview_recipe(**changes)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def recipe_model(tmp_path_factory):
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import run_recipe

    folder = tmp_path_factory.mktemp("recipe")
    card = run_recipe(load_config(_recipe(folder)), folder / "out")
    return folder / "out", card


def test_the_recipe_trains_views_on_some_cases_and_the_fusion_on_the_others(recipe_model):
    from TransferSegLib.models import load_model

    out, card_path = recipe_model
    card = json.loads(card_path.read_text(encoding="utf-8"))
    assert card["method"] == {"name": "multiview", "config": {"fusion": "vfn", "stride": 32}}
    assert set(card["components"]) == {"axial", "coronal", "sagittal", "fusion", "fusion_noimage"}
    assert [card["components"][v]["view"] for v in VIEWS] == list(VIEWS)
    assert card["weights"]["dtype"] == "float16" and card["working_orientation"] == "LPS"
    (split,) = card["training"]["recipe"]["splits"]
    assert len(split["views"]) == 2 and len(split["fusion"]) == 2 and not set(split["views"]) & set(split["fusion"])
    for view in VIEWS:  # each view network saw exactly the view cases
        sub = json.loads((out / "views" / view / "model" / f"ct-liver-tumor-vfn-{view}.json").read_text())
        assert sub["training"]["config"]["data"]["select"] == split["views"]
        assert sub["view"] == view
    stacks = sorted(p.stem for p in (out / "stacks").glob("*.npz"))
    assert stacks == split["fusion"]
    with np.load(out / "stacks" / f"{stacks[0]}.npz", allow_pickle=False) as stored:
        assert stored["image"].shape[0] == 7 and 0 <= stored["image"].min() and stored["image"].max() <= 1
    model = load_model(card_path)
    assert model.components["fusion"].network.in_channels == 7
    assert model.components["fusion_noimage"].network.in_channels == 6
    assert next(model.components["axial"].network.parameters()).dtype == torch.float32


def test_rerunning_the_recipe_redoes_nothing(recipe_model):
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import run_recipe

    out, card_path = recipe_model
    watched = [out / "views" / "axial" / "result.json", out / "fusion" / "result.json",
               next((out / "stacks").glob("*.npz"))]
    before = [p.stat().st_mtime_ns for p in watched]
    run_recipe(load_config(out.parent / "recipe.json"), out)
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_fine_tuning_starts_each_view_and_the_fusion_from_its_own_tensors(recipe_model, tmp_path):
    from TransferSegLib.models import load_model
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import run_recipe

    _, source = recipe_model
    frozen = [{"steps": 1, "optimizer": {"name": "adam", "lr": 0.0}, "loss": "ce"}]   # the weights stay as loaded
    config = tiny_multiview_recipe()
    config["views"].update(stages=frozen, init_weights={"path": str(source), "source_prefix": "{view}.", "strict": True})
    config["fusion"].update(stages=frozen, init_weights={"path": str(source), "source_prefix": "{fusion}.", "strict": True})
    path = tmp_path / "fine.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    tuned = load_model(run_recipe(load_config(path), tmp_path / "out"))
    before = load_model(source)
    for name in VIEWS + ("fusion", "fusion_noimage"):
        new = dict(tuned.components[name].network.named_parameters())
        old = dict(before.components[name].network.named_parameters())
        assert new.keys() == old.keys()
        for key in new:   # float16 storage on both sides: equal to the bit
            assert torch.equal(new[key], old[key]), (name, key)
    axial, coronal = (dict(tuned.components[v].network.named_parameters()) for v in ("axial", "coronal"))
    assert any(not torch.equal(axial[k], coronal[k]) for k in axial)   # not one view's tensors for all three


def test_cross_cross_augmentation_trains_a_view_set_per_fold(tmp_path):
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import _split, validate_recipe

    config = validate_recipe(load_config(_recipe(tmp_path, fusion_data={"cross": 3})))
    names = [f"case-{n}" for n in range(7)]
    groups = _split(names, config)
    assert len(groups) == 3
    predicted = sorted(n for _, fusion, _ in groups for n in fusion)
    assert predicted == names  # every case trains the fusion net once
    for trained, fusion, suffix in groups:  # by view networks that never saw it
        assert not set(trained) & set(fusion) and sorted(trained + fusion) == names
    assert [suffix for _, _, suffix in groups] == ["-fold0", "-fold1", "-fold2"]
    with pytest.raises(TransferSegError, match="fusion_data"):
        validate_recipe(dict(config, fusion_data={"cross": 3, "split": 0.2}))
    with pytest.raises(TransferSegError, match="views.stages"):
        broken = json.loads(json.dumps(config))
        broken["views"]["stages"][0]["optimizer"]["name"] = "adamw"
        validate_recipe(broken)


@pytest.mark.parametrize("fusion", ["vfn", "vfn-noimage", "majority", "staple"])
def test_the_multiview_method_writes_views_disagreement_and_fusion(recipe_model, tmp_path, fusion):
    from TransferSegLib.models import load_model
    from TransferSegLib.phantoms import ct_phantom
    from TransferSegLib.pipeline import run

    _, card_path = recipe_model
    volume, _ = ct_phantom(4321, shape=(20, 40, 44))
    result = run(volume, load_model(card_path), device="cpu", method_options={"fusion": fusion})
    assert result.labels.shape == volume.shape
    assert set(result.views) == set(VIEWS)
    for view in VIEWS:
        assert result.views[view].shape == (3,) + volume.shape and result.views[view].dtype == np.uint8
    assert result.disagreement.shape == volume.shape
    assert 0 <= result.disagreement.min() and result.disagreement.max() <= 1
    assert result.method_summary["fusion"] == fusion
    assert {"views", "fusion"} <= {k.replace("inference_", "") for k in result.timings}
    if fusion == "majority":  # on the input grid the labels are the vote of the views brought back
        expected = majority_vote([result.views[v] for v in VIEWS])
        assert np.mean(result.labels == expected) > 0.99
    files = result.write(tmp_path / "out")
    assert {"views/axial.nii.gz", "views/coronal.nii.gz", "views/sagittal.nii.gz", "disagreement.nii.gz",
            "views.png"} <= set(files)
    summary = json.loads((tmp_path / "out" / "result.json").read_text(encoding="utf-8"))
    assert summary["method"]["fusion"] == fusion and "share_views_differ" in summary["method"]
    assert set(summary["files"]) == set(files)


def test_segment_fusion_flag_and_its_errors(recipe_model, tmp_path):
    from TransferSegLib.io import save_volume
    from TransferSegLib.phantoms import ct_phantom

    _, card_path = recipe_model
    volume, _ = ct_phantom(99, shape=(16, 32, 32))
    image = tmp_path / "ct.nii.gz"
    save_volume(volume, image)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([PYTHON, "-m", "TransferSegLib.cli", "segment", str(image), "-o", str(tmp_path / "s"),
                         "--model", str(card_path), "--fusion", "staple"], capture_output=True, encoding="utf-8", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "staple fusion" in ok.stdout and (tmp_path / "s" / "views" / "sagittal.nii.gz").exists()
    single = subprocess.run([PYTHON, "-m", "TransferSegLib.cli", "segment", str(image), "-o", str(tmp_path / "t"),
                             "--fusion", "majority"], capture_output=True, encoding="utf-8", env=env)
    assert single.returncode == 2 and "--fusion does not apply" in single.stderr
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_a_fusion_the_model_lacks_is_a_clear_error(recipe_model, tmp_path):
    from TransferSegLib.models import compose_models, load_model
    from TransferSegLib.phantoms import ct_phantom
    from TransferSegLib.pipeline import run

    out, _ = recipe_model
    parts = {view: out / "views" / view / "model" / f"ct-liver-tumor-vfn-{view}.json" for view in VIEWS}
    card = compose_models(parts, tmp_path, name="views-only", method="multiview", method_config={"fusion": "majority"})
    volume, _ = ct_phantom(5, shape=(16, 32, 32))
    with pytest.raises(TransferSegError, match="fusion 'vfn' is not available.*majority, staple"):
        run(volume, load_model(card), device="cpu", method_options={"fusion": "vfn"})
    assert run(volume, load_model(card), device="cpu").method_summary["fusion"] == "majority"


def test_the_pipeline_gives_a_sagittally_stored_phantom_the_same_axial_view(recipe_model):
    """End to end: the phantom as generated (LPS axial) and stored as sagittal slices (PIL: i → P,
    j → I, k → L) give the same axial-view prediction and fused labels once the file order is undone."""
    from TransferSegLib.models import load_model
    from TransferSegLib.phantoms import ct_phantom
    from TransferSegLib.pipeline import run
    from TransferSegLib.resample import to_orientation

    _, card_path = recipe_model
    model = load_model(card_path)
    volume, _ = ct_phantom(77, shape=(18, 40, 36))
    sagittal, turn = to_orientation(volume, "PIL")
    assert sagittal.shape != volume.shape
    plain = run(volume, model, device="cpu")
    stored = run(sagittal, model, device="cpu")
    for view in VIEWS:
        back = np.stack([turn.undo(channel) for channel in stored.views[view]])
        assert np.array_equal(back, plain.views[view]), view
    assert np.array_equal(turn.undo(stored.labels), plain.labels)
    assert np.any(plain.views["axial"] != plain.views["sagittal"])  # the views really differ


def test_cross_cross_augmentation_end_to_end(tmp_path):
    """K = 2 folds: two fold sets of view networks, each predicting the fold it did not see, and the
    final view networks trained on every case; the model ships the final ones."""
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import run_recipe

    config = load_config(_recipe(tmp_path, fusion_data={"cross": 2, "roi_margin": 4}, ablation_no_image=False))
    card_path = run_recipe(config, tmp_path / "out")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    splits = card["training"]["recipe"]["splits"]
    assert len(splits) == 2 and sorted(splits[0]["fusion"] + splits[1]["fusion"]) == sorted(
        splits[0]["views"] + splits[0]["fusion"])
    out = tmp_path / "out"
    for k, split in enumerate(splits):
        sub = json.loads((out / f"views-fold{k}" / "coronal" / "model" / f"ct-liver-tumor-vfn-coronal-fold{k}.json")
                         .read_text(encoding="utf-8"))
        assert sub["training"]["config"]["data"]["select"] == split["views"]
    final = json.loads((out / "views" / "coronal" / "model" / "ct-liver-tumor-vfn-coronal.json").read_text(encoding="utf-8"))
    assert sorted(final["training"]["config"]["data"]["select"]) == sorted(splits[0]["views"] + splits[0]["fusion"])
    assert card["training"]["composed_from"]["coronal"]["sha256"] == final["weights"]["sha256"]
    assert sorted(p.stem for p in (out / "stacks").glob("*.npz")) == sorted(splits[0]["views"] + splits[0]["fusion"])
    assert "fusion_noimage" not in card["components"]


def test_vfn_view_prior_starts_from_the_views_soft_vote():
    """With its own head silenced, a view-prior VFN gives log of the three views' mean class
    probabilities: its argmax is the soft vote of the views."""
    net = VFN(7, 3, view_prior=True).eval()
    with torch.no_grad():
        net.head[2].weight.zero_()
        net.head[2].bias.zero_()
    rng = np.random.default_rng(5)
    views = []
    for _ in range(3):
        p = rng.dirichlet(np.ones(3), size=(8, 8, 8)).transpose(3, 0, 1, 2).astype(np.float32)
        views.append(np.round(p * 255).astype(np.uint8))
    x = torch.from_numpy(fusion_input(rng.random((8, 8, 8), dtype=np.float32), views))[None]
    with torch.no_grad():
        out = net(x)[0].numpy()
    nested = [np.cumsum(v[::-1].astype(np.float64) / 255, axis=0)[::-1] for v in views]  # P(≥ 0), P(≥ 1), P(≥ 2)
    mean = np.mean([np.stack([1 - n[1], n[1] - n[2], n[2]]) for n in nested], axis=0)
    assert np.allclose(np.exp(out), np.maximum(mean, 1e-3), atol=1e-4)
    assert np.mean(out.argmax(axis=0) == mean.argmax(axis=0)) > 0.99
    assert VFN(7, 3, view_prior=True).config["view_prior"] is True and "view_prior" not in VFN(7, 3).config
    with pytest.raises(TransferSegError, match="view_prior needs"):
        VFN(4, 3, view_prior=True)
