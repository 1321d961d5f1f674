"""H-DenseUNet's training and cascade (Li et al. 2018, sec. III-C and III-D): the trainer's named
heads, per-stage network options and prefixed initial weights; the inferer's per-axis margin;
nested thresholds; the ``cascade`` recipe and method end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from TransferSegLib.inference import sliding_window_inference
from TransferSegLib.methods.cascade import nested_threshold_labels
from TransferSegLib.nets import build_network
from TransferSegLib.training import train, validate_config
from TransferSegLib.training.networks import load_weights_into
from TransferSegLib.volume import TransferSegError

SMALL = dict(init_channels=8, growth_rate=4, block_layers=[1, 2, 1, 1], decoder_channels=[16, 8, 8, 8, 6])
CONFIG = Path(__file__).resolve().parents[1] / "Resources" / "configs" / "ct-liver-tumor-hdenseunet.json"


def tiny_cascade_recipe(**changes) -> dict:
    """The shipped cascade recipe shrunk to seconds: 3 small phantoms, tiny networks, 2 steps per stage."""
    config = json.loads(CONFIG.read_text(encoding="utf-8"))
    config["data"] = {"phantom": "ct", "count": 3, "seed": 1000, "options": {"shape": [24, 64, 64]}}
    config["coarse"]["architecture"]["config"].update(base_channels=4, levels=3)
    config["coarse"]["patch_size"] = [4, 16, 16]
    config["coarse"]["data"] = {"count": 2}
    for part in ("net2d", "hybrid", "net3d"):
        config[part]["patch_size"] = [8, 32, 32]
        config[part]["inference"]["patch_size"] = [8, 64, 64]
    config["net2d"]["architecture"]["config"].update(SMALL)
    config["hybrid"]["architecture"]["config"].update(net2d=SMALL, net3d=SMALL, hff_channels=6)
    config["net3d"]["architecture"]["config"].update(SMALL)
    for part in ("coarse", "net2d", "hybrid", "net3d"):
        for stage in config[part]["stages"]:
            stage["steps"] = 2
    config["threads"] = 1
    config.update(changes)
    return config


# --- the inferer's margin -----------------------------------------------------------------------
class WindowEdges(nn.Module):
    """Class 1 on a window's first and last two slices, class 0 inside: shows which slices count."""

    size_multiple = (1, 1, 1)

    def forward(self, x):
        edge = torch.zeros_like(x[:, :1])
        edge[:, :, :2] = 1.0
        edge[:, :, -2:] = 1.0
        return torch.cat([1.0 - edge, edge], 1) * 20.0


def test_margin_drops_each_windows_edge_slices_but_not_the_volumes():
    array = np.zeros((30, 8, 8), np.float32)
    kwargs = dict(patch_size=(8, 8, 8), overlap=0.75, blend="constant", device="cpu", return_probabilities=True)
    plain = sliding_window_inference(array, WindowEdges(), **kwargs)
    dropped = sliding_window_inference(array, WindowEdges(), margin=(2, 0, 0), **kwargs)
    # without the margin, 2 of the 4 windows over an inner slice have it at an edge: P(1) = 0.5
    assert np.all(np.abs(plain.probabilities[1, 8:22].astype(int) - 128) <= 1)
    assert np.all(dropped.probabilities[1, 2:28] == 0)
    per_slice = dropped.labels.any(axis=(1, 2))
    assert per_slice.tolist() == [True] * 2 + [False] * 26 + [True] * 2  # only the volume's own ends


def test_margin_leaves_a_position_independent_network_unchanged():
    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, 1)
    array = np.random.default_rng(0).random((21, 16, 16)).astype(np.float32)
    kwargs = dict(patch_size=(8, 16, 16), overlap=0.75, device="cpu", return_probabilities=True)
    a = sliding_window_inference(array, net, **kwargs)
    b = sliding_window_inference(array, net, margin=(2, 0, 0), **kwargs)
    assert np.abs(a.probabilities.astype(int) - b.probabilities).max() <= 1
    assert np.array_equal(a.labels, b.labels)


def test_a_margin_the_windows_cannot_tile_is_an_error():
    with pytest.raises(TransferSegError, match="raise the overlap to at least 0.5"):
        sliding_window_inference(np.zeros((30, 8, 8), np.float32), WindowEdges(), patch_size=(8, 8, 8),
                                 overlap=0.25, device="cpu", margin=(2, 0, 0))


# --- thresholds -----------------------------------------------------------------------------------
def test_nested_thresholds_follow_the_paper_rule():
    # P(background), P(liver), P(tumor) on a 0…255 scale, one voxel per column
    p = np.array([[200, 100, 20, 10, 0],
                  [50, 150, 135, 40, 10],
                  [5, 5, 100, 205, 245]], np.uint8)
    labels = nested_threshold_labels(p, [0.5, 0.9]).numpy()
    # foreground = P(liver) + P(tumor) ≥ 0.5; tumor where P(tumor) ≥ 0.9 as well
    expected = [0, 1, 1, 1, 2]
    assert labels.tolist() == expected
    assert nested_threshold_labels(p, [0.5, 0.5]).numpy().tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(TransferSegError, match="one per label"):
        nested_threshold_labels(p, [0.5])


# --- H-DenseUNet heads ------------------------------------------------------------------------------
def test_hdenseunet_2d_head_alone_skips_the_3d_network():
    torch.manual_seed(0)
    net = build_network("hdenseunet", dict(net2d=SMALL, net3d=SMALL, hff_channels=6)).eval()
    calls = []
    net.net3d.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 1, 4, 32, 32)
    with torch.no_grad():
        alone = net(x, heads=("net2d",))
        assert not calls and set(alone) == {"net2d"}
        both = net(x, heads=True)
        assert calls and torch.allclose(alone["net2d"], both["net2d"])
    with pytest.raises(TransferSegError, match="not 'seg'"):
        net(x, heads=("seg",))


# --- trainer: initial weights into a prefix --------------------------------------------------------
def test_weights_load_into_a_prefix_and_report_what_matched():
    torch.manual_seed(0)
    net2d = build_network("denseunet2d_slices", SMALL)
    hybrid = build_network("hdenseunet", dict(net2d=SMALL, net3d=SMALL, hff_channels=6))
    state = {k[len("net."):]: v for k, v in net2d.state_dict().items()}
    report = load_weights_into(hybrid, state, "net2d.", strict=True)
    assert report["loaded"] == report["network_keys_under_prefix"] == len(state)
    for key, value in state.items():
        assert torch.equal(hybrid.state_dict()["net2d." + key], value)
    # strict: a missing tensor is named; not strict: it is reported and the rest loads
    partial = dict(list(state.items())[1:])
    with pytest.raises(TransferSegError, match="of the network not in the weights"):
        load_weights_into(hybrid, partial, "net2d.", strict=True)
    report = load_weights_into(hybrid, partial, "net2d.", strict=False)
    assert report["not_in_weights"] == ["net2d." + next(iter(state))]
    # a load that matches nothing is an error, strict or not (it used to be silent)
    with pytest.raises(TransferSegError, match="none of its .* tensors matches"):
        load_weights_into(hybrid, state, "hff.", strict=False)


# --- trainer: heads and per-stage options ---------------------------------------------------------------
def _hybrid_config(tmp_path, stages, **changes) -> dict:
    config = dict(name="t", architecture={"name": "hdenseunet", "config": dict(net2d=SMALL, net3d=SMALL,
                                                                                 hff_channels=6)},
                  labels=[{"name": "liver", "label": 1}, {"name": "liver tumor", "label": 2}],
                  data={"phantom": "ct", "count": 1, "seed": 1000, "options": {"shape": [24, 48, 48]},
                        "cache": str(tmp_path / "cases")},
                  validation={"fraction": 0.0}, preprocessing={"hu_window": [-200, 250]},
                  patch_size=[8, 32, 32], batch_size=1, stages=stages, checkpoint_every=100, threads=1)
    config.update(changes)
    return config


def _stage(name, steps, **keys):
    return dict(name=name, steps=steps, optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.9},
                loss={"name": "ce", "class_weights": [0.78, 0.65, 8.57]}, **keys)


def test_stages_train_their_heads_with_their_options(tmp_path, monkeypatch):
    from TransferSegLib.nets.hdenseunet import HDenseUNet

    seen = []
    original = HDenseUNet.forward

    def spy(self, x, heads=False):
        seen.append((heads, self.net2d.unet_connections))
        return original(self, x, heads)

    monkeypatch.setattr(HDenseUNet, "forward", spy)
    stages = [_stage("warm-up", 1, heads={"net2d": 1.0}, frozen=["net3d", "hff"],
                     network={"net2d.unet_connections": False}),
              _stage("hff", 1, heads={"hff": 1.0}, frozen=["net2d"], freeze_bn=True),
              _stage("joint", 1, heads={"hff": 1.0, "net2d": 0.5})]
    config = validate_config(_hybrid_config(tmp_path, stages))
    train(config, tmp_path / "run")
    assert seen[:3] == [(("net2d",), False), (("hff",), True), (("hff", "net2d"), True)]
    rows = (tmp_path / "run" / "log.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4


def test_the_joint_loss_is_the_weighted_sum_of_the_heads(tmp_path):
    """One step of L = λ·L(2D) + L(HFF) from the trainer equals the same SGD step by hand."""
    from TransferSegLib.losses import build_loss
    from TransferSegLib.training.sampling import PatchSampler, load_cases, cases_from_spec

    stages = [_stage("joint", 1, heads={"hff": 1.0, "net2d": 0.5})]
    config = validate_config(_hybrid_config(tmp_path, stages, augmentation={"scale": [0.8, 1.2]}))
    train(config, tmp_path / "run")
    from TransferSegLib.models import load_model

    trained = load_model(tmp_path / "run" / "model" / "t.json").network

    torch.manual_seed(config["seed"])
    net = build_network("hdenseunet", config["architecture"]["config"])
    cases = load_cases(cases_from_spec(config["data"]), config, Path(config["data"]["cache"]), 0)
    from TransferSegLib.training.trainer import step_seed

    torch.manual_seed(step_seed(config["seed"], 0, 0))
    images, targets = PatchSampler(cases, config).batch(0, range(1))
    net.train()
    out = net(images, heads=True)
    loss_fn = build_loss(config["stages"][0]["loss"])
    loss = loss_fn(out["hff"], targets) + 0.5 * loss_fn(out["net2d"], targets)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for key, value in net.state_dict().items():
        assert torch.allclose(trained.state_dict()[key].float(), value.float(), atol=1e-5), key


def test_bad_heads_and_network_options_are_named(tmp_path):
    with pytest.raises(TransferSegError, match=r"stages\[0\].heads"):
        validate_config(_hybrid_config(tmp_path, [_stage("s", 1, heads={"hff": "one"})]))
    config = validate_config(_hybrid_config(tmp_path, [_stage("s", 1, network={"net2d.no_such_switch": False})]))
    with pytest.raises(TransferSegError, match="no plain attribute 'no_such_switch'"):
        train(config, tmp_path / "run")
    config = validate_config(_hybrid_config(tmp_path, [_stage("s", 1, heads={"seg": 1.0})]))
    with pytest.raises(TransferSegError, match="not 'seg'"):
        train(config, tmp_path / "run2")


# --- the recipe and the method end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    from TransferSegLib.training.recipes import run_recipe

    folder = tmp_path_factory.mktemp("cascade")
    return folder, run_recipe(tiny_cascade_recipe(), folder / "run")


def test_cascade_recipe_trains_composes_and_segments_on_the_input_grid(cascade_run):
    from TransferSegLib import pipeline
    from TransferSegLib.models import load_model
    from TransferSegLib.phantoms import ct_phantom
    from TransferSegLib.training.recipes import run_recipe

    tmp_path, card = cascade_run
    report = json.loads((tmp_path / "run" / "hybrid" / "init_weights.json").read_text(encoding="utf-8"))
    assert report["loaded"] == report["network_keys_under_prefix"] > 0 and report["prefix"] == "net2d."
    assert (tmp_path / "run" / "net3d" / "result.json").exists()  # Table II's 3D row is trained too
    loaded = load_model(card)
    assert loaded.method["name"] == "cascade" and set(loaded.components) == {"coarse", "fine"}
    assert loaded.components["coarse"].spec["working_spacing_mm"] == [6.0, 4.0, 4.0]
    stage1 = load_model(tmp_path / "run" / "net2d" / "model" / "ct-liver-tumor-hdenseunet-net2d.json").network
    fine = loaded.components["fine"].network
    # the hybrid started from stage 1's 2D network (then trained on): same keys and shapes
    assert {k: v.shape for k, v in fine.net2d.state_dict().items()} == \
        {k[len("net."):]: v.shape for k, v in stage1.state_dict().items()}

    volume, _ = ct_phantom(7, shape=(20, 64, 64))
    mtime = (tmp_path / "run" / "model" / Path(card).name).stat().st_mtime
    assert run_recipe(tiny_cascade_recipe(), tmp_path / "run") == card  # resumes: nothing retrained
    assert (tmp_path / "run" / "hybrid" / "result.json").stat().st_mtime < mtime
    # force a box: the tiny coarse network may find nothing; the method then returns background
    result = pipeline.run(volume, loaded, device="cpu", return_probabilities=True)
    assert result.labels.shape == volume.shape and result.probabilities.shape == (3,) + volume.shape
    assert "liver_box_kji" in result.method_summary and result.method_summary["thresholds"] == [0.5, 0.9]
    assert set(result.timings) >= {"inference_coarse"}


def test_cascade_labels_follow_the_thresholds_on_the_input_grid(cascade_run, monkeypatch):
    """With a coarse network that finds everything, the fine output's thresholded labels reach
    the input grid through ``decide``: the labels there are the thresholds of the probabilities."""
    from TransferSegLib import pipeline
    from TransferSegLib.methods import cascade
    from TransferSegLib.models import load_model
    from TransferSegLib.phantoms import ct_phantom
    from TransferSegLib.pipeline import postprocess

    loaded = load_model(cascade_run[1])
    loaded.card.pop("expects")  # an untrained network's liver is no plausible liver: the scope checks would empty it
    monkeypatch.setattr(cascade, "liver_box", lambda context, *a: ((0, 0, 0) + context.volume.shape, 1.0))
    volume, _ = ct_phantom(7, shape=(20, 64, 64))
    loaded.card["working_spacing_mm"] = [4.0, 6.0, 6.0]  # a small working grid, still resampled both ways
    for thresholds in ([0.5, 0.9], [0.3, 0.4]):
        loaded.method["config"]["thresholds"] = thresholds
        result = pipeline.run(volume, loaded, device="cpu", return_probabilities=True)
        assert result.method_summary["liver_box_kji"] == [0, 0, 0, *result.method_summary["liver_box_kji"][3:]]
        expected = nested_threshold_labels(result.probabilities, thresholds).numpy()
        expected = postprocess(expected, loaded.card.get("postprocessing"))
        # the probabilities were rounded to uint8 after the slab's labels were taken: allow a sliver
        assert np.mean(result.labels == expected) > 0.995
    loaded.method["config"] = {"threshold": 0.5}
    with pytest.raises(TransferSegError, match="method.config.threshold is not a cascade setting"):
        pipeline.run(volume, loaded, device="cpu")


def test_a_trained_cascade_fine_tunes_from_its_own_tensors_without_a_stage_1(cascade_run):
    """A cascade config whose parts name init_weights (here the trained model's ``coarse.`` and
    ``fine.`` tensors, by a path relative to the config file) needs no net2d stage: each part
    starts from those tensors, and one Adam step moves no weight by more than its rate."""
    from TransferSegLib.models import load_model
    from TransferSegLib.training import load_config
    from TransferSegLib.training.recipes import run_recipe

    tmp_path, card = cascade_run
    config = tiny_cascade_recipe()
    del config["net2d"], config["net3d"]
    relative = Path("run") / "model" / Path(card).name  # the config is written beside run/
    for part, prefix in (("coarse", "coarse."), ("hybrid", "fine.")):
        config[part]["init_weights"] = {"path": str(relative), "source_prefix": prefix, "strict": True}
        config[part]["stages"] = [dict(config[part]["stages"][-1], steps=1, frozen=[], freeze_bn=False,
                                       optimizer={"name": "adam", "lr": 1e-4})]
    path = tmp_path / "fine-tune.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    tuned = run_recipe(load_config(path), tmp_path / "tuned")
    for part in ("coarse", "hybrid"):
        report = json.loads((tmp_path / "tuned" / part / "init_weights.json").read_text(encoding="utf-8"))
        assert report["loaded"] == report["network_keys_under_prefix"] > 0, part
        assert report["source"] == str((tmp_path / relative).resolve())
    assert not (tmp_path / "tuned" / "net2d").exists()
    def parameters(model):
        return {f"{name}.{key}": value for name, component in load_model(model).components.items()
                for key, value in component.network.named_parameters()}

    before, after = parameters(card), parameters(tuned)
    assert before.keys() == after.keys()
    moved = 0
    for key, value in after.items():
        # fp16 storage on both sides: one step of at most lr, plus rounding
        assert torch.allclose(value.float(), before[key].float(), atol=1.05e-4, rtol=2e-3), key
        moved += not torch.equal(value, before[key])
    assert moved > len(after) // 2  # it trained

    without = tiny_cascade_recipe()
    del without["net2d"]
    with pytest.raises(TransferSegError, match="net2d: required"):
        run_recipe(without, tmp_path / "no-stage-1")
