"""Tests for MC-GCN and AH-Net (TransferSegLib/nets/mcgcn.py, TransferSegLib/nets/ahnet.py).

The transfer is checked the way the AH-Net paper (sec. 3.2) states it: on a volume, the 3D
input layer equals the 2D conv1 on hand-built three-slice stacks (eq. (1)), every in-plane conv
equals its 2D conv slice by slice (eqs. (2)-(3)), and whole encoder blocks equal the 2D blocks
slice by slice (then a max over slice pairs where the AH-Downsample halves z). Everything runs
in eval mode with random BatchNorm statistics, so forgetting the running statistics fails.
Parameter counts are compared with the paper's Table 2 and with sums written out by hand.
"""
import json
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file
from torch import nn

from conftest import randomize_bn
from TransferSegLib import training
from TransferSegLib.nets import AHNet, MCGCN, build_network, transfer_mcgcn_to_ahnet
from TransferSegLib.volume import TransferSegError

SMALL_GCN = {"in_channels": 3, "out_channels": 2, "backbone": "resnet18",
             "kernel_sizes": [7, 5, 5, 3, 3, 3], "gcn_channels": 4}
SMALL_AH = {"growth_rate": 4, "dense_layers": 2, "bottleneck_factor": 2, "psp_sizes": [8, 4, 2, 1]}

# AH-Net paper, Table 2.
PAPER_GCN_PARAMETERS = 23_576_758
PAPER_AHNET_PARAMETERS = 27_085_500
PAPER_AHNET_CONV_LAYERS = 123


def count(model):
    return sum(p.numel() for p in model.parameters())


def slicewise(module2d, x):
    """Apply a 2D module to every slice of (N, C, D, H, W) independently."""
    n, c, d, h, w = x.shape
    y = module2d(x.permute(0, 2, 1, 3, 4).reshape(n * d, c, h, w))
    return y.reshape(n, d, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def z_max(x):
    """Max over neighbouring slice pairs (paper MaxPool 1×1×2/(1, 1, 2)), written out by hand."""
    return torch.maximum(x[:, :, 0::2], x[:, :, 1::2])


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def small_pair():
    """A small MC-GCN with random BN statistics, and the AH-Net transferred from it, in eval mode."""
    torch.manual_seed(0)
    mcgcn = randomize_bn(MCGCN(**SMALL_GCN)).eval()
    return mcgcn, transfer_mcgcn_to_ahnet(mcgcn, out_channels=3, **SMALL_AH)


@pytest.fixture(scope="module")
def paper_mcgcn():
    torch.manual_seed(0)
    return MCGCN(out_channels=1).eval()  # ResNet50, the DBT heatmap network of Table 2


# ------------------------------------------------------------------------- parameter counts


def test_paper_parameter_counts(paper_mcgcn):
    ahnet = AHNet(out_channels=1)
    gcn_count, ahnet_count = count(paper_mcgcn), count(ahnet)
    print(f"\nResNet50 MC-GCN: {gcn_count:,} parameters (paper Table 2: {PAPER_GCN_PARAMETERS:,})"
          f"\nResNet50 AH-Net: {ahnet_count:,} parameters (paper Table 2: {PAPER_AHNET_PARAMETERS:,})")
    assert abs(gcn_count / PAPER_GCN_PARAMETERS - 1) < 0.01
    assert abs(ahnet_count / PAPER_AHNET_PARAMETERS - 1) < 0.01

    # Exactly, by hand. torchvision's ResNet50 without its 1000-class fc layer:
    resnet = torchvision.models.resnet50(weights=None)
    backbone = count(resnet) - count(resnet.fc)
    c = 1  # GCN maps = output maps (sec. 3.1)
    gcn = sum(2 * k * cin * c + 2 * k * c * c + 4 * c          # K×1 + 1×K and 1×K + K×1, with biases
              for cin, k in [(64, 63), (64, 31), (256, 15), (512, 9), (1024, 7), (2048, 5)])
    refinement = 11 * 2 * (9 * c * c + c)                      # 6 after GCNs + 5 after sums
    up = 6 * (c * c + c)                                       # 5 "Up" 1×1 convs + the final one
    assert gcn_count == backbone + gcn + refinement + up
    # The paper's number counts the authors' code, whose final projection is a 3×3×1 conv on
    # 124 + 4 channels; sec. 3.3 (and ours) says 1×1×1: 128 · (9 - 1) fewer weights.
    assert ahnet_count == PAPER_AHNET_PARAMETERS - 128 * 8
    assert sum(isinstance(m, nn.Conv3d) for m in ahnet.modules()) == PAPER_AHNET_CONV_LAYERS
    # The encoder part is exactly the 2D backbone (no parameter gained or lost by eqs. (1)-(3)).
    assert count(ahnet.encoder) == backbone


def test_ahnet_count_matches_monai_trilinear_ahnet():
    """An independent implementation of the same decoder (MONAI, from the authors' code)."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    reference = monai_nets.AHNet(out_channels=1, upsample_mode="trilinear")
    assert count(AHNet(out_channels=1)) == count(reference) - 128 * 8  # their final conv is 3×3×1


def test_small_config_parameter_counts(small_pair):
    mcgcn, ahnet = small_pair
    print(f"\nsmall MC-GCN (resnet18, kernels {SMALL_GCN['kernel_sizes']}): {count(mcgcn):,}"
          f"\nsmall AH-Net ({SMALL_AH}): {count(ahnet):,}")
    resnet18 = torchvision.models.resnet18(weights=None)
    assert count(mcgcn.encoder) == count(ahnet.encoder) == count(resnet18) - count(resnet18.fc)


def test_paper_gcn_kernel_sizes(paper_mcgcn):
    """Sec. 3.1: GCN kernels 63, 31, 15, 9, 7, 5 at conv1, max pool, layer1 … layer4."""
    expected = [(64, 63), (64, 31), (256, 15), (512, 9), (1024, 7), (2048, 5)]
    for gcn, (cin, k) in zip(paper_mcgcn.gcn, expected):
        assert [tuple(m.kernel_size) for m in gcn.left] == [(k, 1), (1, k)]
        assert [tuple(m.kernel_size) for m in gcn.right] == [(1, k), (k, 1)]
        assert gcn.left[0].in_channels == gcn.right[0].in_channels == cin


def test_gcn_receptive_field_is_k_by_k():
    """A GCN reaches exactly K//2 pixels in each direction, corners included (both branches)."""
    torch.manual_seed(0)
    k = 5
    gcn = MCGCN(**SMALL_GCN).gcn[1]  # K = 5 on 64 channels
    x = torch.randn(1, 64, 15, 15)
    base = gcn(x)[0, :, 7, 7]
    for dy, dx, reaches in [(2, 2, True), (-2, 2, True), (3, 0, False), (0, -3, False), (2, 3, False)]:
        y = x.clone()
        y[0, :, 7 + dy, 7 + dx] += 1.0
        changed = not torch.allclose(gcn(y)[0, :, 7, 7], base)
        assert changed == reaches, (dy, dx, k)


# ------------------------------------------------------------------------- shapes and sizes


def test_ahnet_odd_sizes_are_padded_and_cropped(small_pair):
    _, ahnet = small_pair
    x = torch.randn(1, 1, 20, 30, 27)
    with torch.no_grad():
        y = ahnet(x)
        # Same as padding by hand with the border voxels on the high side and cropping.
        padded = F.pad(x, (0, 5, 0, 2, 0, 12), mode="replicate")
        assert padded.shape[2:] == (32, 32, 32)
        y_padded = ahnet(padded)
    assert y.shape == (1, 3, 20, 30, 27)
    close(y, y_padded[..., :20, :30, :27])
    assert ahnet.size_multiple == (32, 32, 32)


def test_mcgcn_odd_sizes(small_pair):
    mcgcn, _ = small_pair
    with torch.no_grad():
        assert mcgcn(torch.randn(2, 3, 37, 45)).shape == (2, 2, 37, 45)
        assert mcgcn(torch.randn(1, 3, 5, 7)).shape == (1, 2, 5, 7)


def test_encoder_halves_z_like_x_and_y_five_times(small_pair):
    _, ahnet = small_pair
    with torch.no_grad():
        features = ahnet.encoder(torch.randn(1, 1, 32, 64, 96))
    sizes = [tuple(f.shape[2:]) for f in features]
    assert sizes == [(16, 32, 48), (8, 16, 24), (8, 16, 24), (4, 8, 12), (2, 4, 6), (1, 2, 3)]


def test_paper_configuration_runs_on_a_small_odd_input(paper_mcgcn):
    ahnet = transfer_mcgcn_to_ahnet(paper_mcgcn, out_channels=1).eval()
    start = time.perf_counter()
    with torch.no_grad():
        y = ahnet(torch.randn(1, 1, 9, 31, 26))
    print(f"\nResNet50 AH-Net forward on 9×31×26 (padded to 32×32×32): {time.perf_counter() - start:.2f} s")
    assert y.shape == (1, 1, 9, 31, 26) and torch.isfinite(y).all()


# ------------------------------------------------------------------------- transfer equivalences


def test_input_layer_equals_2d_conv1_on_three_slice_stacks(small_pair):
    """Eq. (1): 2D conv1 on stacks (s[d-1], s[d], s[d+1]) as RGB, zeros beyond the volume."""
    mcgcn, ahnet = small_pair
    torch.manual_seed(1)
    volume = torch.randn(1, 1, 6, 20, 18)
    padded = torch.cat([torch.zeros(1, 1, 1, 20, 18), volume, torch.zeros(1, 1, 1, 20, 18)], dim=2)
    stacks = torch.stack([padded[0, 0, d:d + 3] for d in range(6)])  # (6, 3, H, W): R = previous slice
    with torch.no_grad():
        expected = mcgcn.encoder.conv1(stacks)            # (D, 64, H/2, W/2)
        actual = ahnet.encoder.conv1(volume)[0].transpose(0, 1)
    assert ahnet.encoder.conv1.weight.shape == (64, 1, 3, 7, 7)
    close(actual, expected)
    # The whole input unit: conv1, BN, ReLU, then paper MaxPool 1×1×2 over slice pairs.
    with torch.no_grad():
        stem2d = mcgcn.encoder.relu(mcgcn.encoder.bn1(expected)).transpose(0, 1)[None]
        conv_x = ahnet.encoder(F.pad(volume, (0, 14, 0, 12, 0, 26)))[0][:, :, :3, :10, :9]
    close(conv_x, z_max(stem2d)[..., :10, :9])


def test_every_inplane_conv_equals_its_2d_conv_slice_by_slice(small_pair):
    """Eqs. (2)-(3): every other conv is paper k×k×1 (torch (1, k, k)), strides in-plane only."""
    mcgcn, ahnet = small_pair
    torch.manual_seed(2)
    convs = [(n, m) for n, m in mcgcn.encoder.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert len(convs) == 19  # resnet18: 8 blocks × 2 + 3 downsample shortcuts
    for name, conv2d in convs:
        conv3d = ahnet.encoder.get_submodule(name)
        assert isinstance(conv3d, nn.Conv3d) and conv3d.kernel_size[0] == 1 and conv3d.stride[0] == 1
        x = torch.randn(1, conv2d.in_channels, 3, 9, 10)
        with torch.no_grad():
            close(conv3d(x), slicewise(conv2d, x))


def test_batchnorm_running_statistics_are_transferred(small_pair):
    mcgcn, ahnet = small_pair
    norms = [(n, m) for n, m in mcgcn.encoder.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == sum(isinstance(m, nn.BatchNorm3d) for m in ahnet.encoder.modules()) == 20
    for name, bn2d in norms:
        bn3d = ahnet.encoder.get_submodule(name)
        assert isinstance(bn3d, nn.BatchNorm3d)
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(bn3d, key), getattr(bn2d, key)), (name, key)
        assert not torch.equal(bn3d.running_var, torch.ones_like(bn3d.running_var))


def test_layer1_equals_2d_layer1_slice_by_slice(small_pair):
    """A whole transferred block stack without downsampling: slices stay independent."""
    mcgcn, ahnet = small_pair
    torch.manual_seed(3)
    x = torch.randn(2, 64, 4, 12, 11)
    with torch.no_grad():
        close(ahnet.encoder.layer1(x), slicewise(mcgcn.encoder.layer1, x))


def test_downsampling_block_is_2d_branches_then_max_over_slice_pairs(small_pair):
    """Sec. 3.2.3: main path and AH-Downsample shortcut are the 2D branches slice by slice,
    each followed by paper MaxPool 1×1×2/(1, 1, 2), summed, then ReLU."""
    mcgcn, ahnet = small_pair
    torch.manual_seed(4)
    block2d, block3d = mcgcn.encoder.layer2[0], ahnet.encoder.layer2[0]
    x = torch.randn(1, 64, 6, 12, 10)
    with torch.no_grad():
        main = slicewise(lambda t: block2d.bn2(block2d.conv2(block2d.relu(block2d.bn1(block2d.conv1(t))))), x)
        shortcut = slicewise(block2d.downsample, x)
        expected = torch.relu(z_max(main) + z_max(shortcut))
        close(block3d(x), expected)
    assert block3d(x).shape == (1, 128, 3, 6, 5)


def test_transfer_refuses_mismatched_arguments(small_pair):
    mcgcn, _ = small_pair
    with pytest.raises(TransferSegError, match="backbone"):
        transfer_mcgcn_to_ahnet(mcgcn, backbone="resnet34")
    with pytest.raises(TransferSegError, match="in_channels=1"):
        transfer_mcgcn_to_ahnet(mcgcn, in_channels=2, **SMALL_AH)
    with pytest.raises(TransferSegError, match="MCGCN"):
        transfer_mcgcn_to_ahnet(AHNet(**SMALL_AH, backbone="resnet18"))


# ------------------------------------------------------------------------- groups, building, weights


@pytest.mark.parametrize("which", [0, 1])
def test_parameter_groups_cover_every_parameter_once(small_pair, which):
    network = small_pair[which]
    groups = network.parameter_groups()
    assert set(groups) == {"encoder", "decoder"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))
    encoder_names = {n for n, p in network.named_parameters() if id(p) in {id(q) for q in groups["encoder"]}}
    assert encoder_names == {n for n, _ in network.named_parameters() if n.startswith("encoder.")}
    assert "other" not in training.parameter_groups(network)


def test_transferred_parameters_are_exactly_the_encoder_group(small_pair):
    mcgcn, ahnet = small_pair
    names2d = {n for n, _ in mcgcn.encoder.named_parameters()}
    names3d = {n.removeprefix("encoder.") for n, p in ahnet.named_parameters()
               if id(p) in {id(q) for q in ahnet.parameter_groups()["encoder"]}}
    assert names2d == names3d


@pytest.mark.parametrize("name, config", [
    ("mcgcn", SMALL_GCN),
    ("ahnet", {"in_channels": 1, "out_channels": 3, "backbone": "resnet18", **SMALL_AH}),
])
def test_build_from_json_config_and_safetensors_round_trip(name, config):
    torch.manual_seed(5)
    network = randomize_bn(build_network(name, json.loads(json.dumps(config)))).eval()
    assert {k: network.config[k] for k in config} == config and network.architecture_name == name
    assert json.loads(json.dumps(network.config)) == network.config
    rebuilt = build_network(name, json.loads(json.dumps(network.config))).eval()
    rebuilt.load_state_dict(load_safetensors(save_safetensors(network.state_dict())), strict=True)
    x = torch.randn(1, 3, 19, 23) if name == "mcgcn" else torch.randn(1, 1, 7, 19, 23)
    with torch.no_grad():
        assert torch.equal(network(x), rebuilt(x))


def test_paper_defaults_are_json_configs(paper_mcgcn):
    assert paper_mcgcn.config["kernel_sizes"] == [63, 31, 15, 9, 7, 5]
    assert paper_mcgcn.config["backbone"] == "resnet50" and paper_mcgcn.config["gcn_channels"] is None
    assert json.loads(json.dumps(paper_mcgcn.config)) == paper_mcgcn.config


def test_pretrained_torchvision_weights_from_safetensors(tmp_path):
    torch.manual_seed(6)
    resnet = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet.state_dict(), str(path))
    mcgcn = MCGCN(**SMALL_GCN, pretrained_backbone=str(path)).eval()
    assert "pretrained_backbone" not in mcgcn.config  # a trained card carries all its weights
    # The encoder is torchvision's ResNet feature path, layer by layer.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)(x)
        close(mcgcn.encoder(x)[-1], reference)

    pickle = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), pickle)
    with pytest.raises(TransferSegError, match="pickle"):
        MCGCN(**SMALL_GCN, pretrained_backbone=str(pickle))
    with pytest.raises(TransferSegError, match="resnet18"):
        mcgcn.load_resnet_weights(torchvision.models.resnet34(weights=None).state_dict())


def test_clear_errors(small_pair):
    mcgcn, ahnet = small_pair
    with pytest.raises(TransferSegError, match="5D tensor"):
        ahnet(torch.randn(1, 1, 32, 32))
    with pytest.raises(TransferSegError, match="1 input channel"):
        ahnet(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(TransferSegError, match="3 input channel"):
        mcgcn(torch.randn(1, 1, 32, 32))
    with pytest.raises(TransferSegError, match="backbone"):
        build_network("ahnet", {"backbone": "vgg16"})
    with pytest.raises(TransferSegError, match="kernel_sizes"):
        build_network("mcgcn", {"kernel_sizes": [63, 31, 15]})
    with pytest.raises(TransferSegError, match="odd"):
        build_network("mcgcn", {"in_channels": 4})
