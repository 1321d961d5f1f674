"""2D → 3D model conversion (TransferSegLib.nets.convert): ACS paper sec. III, Tables II and III.

Every equivalence runs in eval mode with randomised BatchNorm statistics and affine weights, so
a converter that dropped running_mean/var (NOTES.md) or a weight would fail.
"""
from __future__ import annotations

import hashlib
import json
import math
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from TransferSegLib.nets import UNet2D
from TransferSegLib.nets.acs import ACSConv, MeanACSConv, SoftACSConv
from TransferSegLib.conversion import convert_from_source, save_converted
from TransferSegLib.models import load_model, read_card, save_model
from TransferSegLib.nets.convert import CONVERSION_MODES, InflatedConvTranspose3d, LayerNorm3d, convert
from TransferSegLib.volume import TransferSegError

ACS_MODES = ("acs", "mean_acs", "soft_acs")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norm statistics and affine weights (defaults 0/1 would hide a dropped buffer)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def out(y):
    return y["out"] if isinstance(y, dict) else y


def tv(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    builder = torchvision.models.get_model_builder(name)
    if name.startswith(("deeplabv3", "fcn")):
        kwargs["weights_backbone"] = None
    return builder(weights=None, **kwargs)


def seeded(build):
    torch.manual_seed(0)
    return build()


def small_unet() -> UNet2D:
    torch.manual_seed(0)
    return UNet2D(in_channels=3, out_channels=3, base_channels=4, levels=3)


class Kitchen(nn.Module):
    """Every converted 2D operator once, with tuple arguments and the flags that must survive."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, (3, 3), padding=(2, 2), dilation=(2, 2), groups=2, bias=False),
            nn.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.GELU(),
            nn.MaxPool2d((3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True),
            nn.Conv2d(8, 6, 1), nn.GroupNorm(2, 6), LayerNorm2d(6), nn.Dropout2d(0.3),
            nn.ZeroPad2d(1), nn.AvgPool2d(2, count_include_pad=False, divisor_override=3),
            nn.ConvTranspose2d(6, 6, 4, stride=2, padding=1, groups=3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.ReplicationPad2d(1), nn.LPPool2d(2, 3, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.head = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------
# 2.5D on one slice = the 2D model on that slice
# --------------------------------------------------------------------------------------
MODELS_2D = {
    "resnet18": (lambda: tv("resnet18"), 64),
    "resnet50": (lambda: tv("resnet50"), 64),
    "densenet121": (lambda: tv("densenet121"), 64),
    "deeplabv3_resnet50": (lambda: tv("deeplabv3_resnet50", aux_loss=True), 64),
    "fcn_resnet50": (lambda: tv("fcn_resnet50"), 64),
    "unet2d": (small_unet, 32),
    "convnext_tiny": (lambda: tv("convnext_tiny"), 32),
    "kitchen": (lambda: seeded(Kitchen), 32),
}


@pytest.mark.parametrize("name", MODELS_2D)
def test_2p5d_on_one_slice_equals_2d_and_keeps_parameter_count(name):
    build, size = MODELS_2D[name]
    model = randomise(build()).eval()
    model3d = convert(model, "2.5d")
    assert n_params(model3d) == n_params(model)  # Table III: 2.5D = 2D parameters
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    y2, y3 = model(x), model3d(x[:, :, None])

    def close(a, b):
        # 1e-4 of the output's scale: randomly initialised ResNet-50 logits reach ~400, where
        # conv3d and conv2d differ by float32 rounding (~1e-6 relative; 0 in float64).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))

    if isinstance(y2, dict):  # segmentation: (N, K, 1, H, W), every head
        assert y3.keys() == y2.keys()
        for key in y2:
            assert y3[key].shape == (1, y2[key].shape[1], 1, size, size)
            close(y3[key][:, :, 0], y2[key])
    elif y2.ndim == 4:
        assert y3.shape == (1, y2.shape[1], 1, size, size)
        close(y3[:, :, 0], y2)
    else:  # classifier: still (N, classes)
        assert y3.shape == y2.shape
        close(y3, y2)


# --------------------------------------------------------------------------------------
# Parameter counts (Table III)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: tv("resnet18"), small_unet, Kitchen], ids=["resnet18", "unet2d", "kitchen"])
def test_acs_variants_keep_the_2d_parameter_count(build):
    model = build()
    for mode in ACS_MODES:
        model3d = convert(model, mode)
        # Soft-ACS: C_o(C_i K² + 3) per K×K conv (K > 1); 1×1 convs become Conv3d 1×1×1 (Table II).
        extra = sum(3 * m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
        assert n_params(model3d) == n_params(model) + (extra if mode == "soft_acs" else 0), mode
        assert [n for n, _ in model3d.named_parameters() if "view_weights" not in n] == [n for n, _ in model.named_parameters()]


def test_i3d_parameter_count_follows_the_formula():
    model, model3d = Kitchen(), convert(Kitchen(), "3d")
    expected = n_params(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            k = m.kernel_size[0]
            expected += m.weight.numel() * (k - 1)  # C_o C_i/g K² → C_o C_i/g K³
    assert n_params(model3d) == expected
    assert model3d.features[0].weight.shape == (8, 3, 3, 3, 3)
    assert model3d.features[13].weight.shape == (6, 2, 4, 4, 4)


# --------------------------------------------------------------------------------------
# I3D: a volume whose slices are all the same ("boring video") gives the 2D output
# --------------------------------------------------------------------------------------
def pure_net(padding_mode: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(8, 4, 1),
    )).eval()


def boring(x2d: torch.Tensor, depth: int) -> torch.Tensor:
    return x2d[:, :, None].expand(-1, -1, depth, -1, -1).contiguous()


def test_i3d_on_identical_slices_equals_2d_with_replicate_padding_everywhere():
    # Replicate padding along depth repeats the same slice, so every output slice is exact.
    model = pure_net("replicate")
    x = torch.randn(2, 3, 16, 16)
    y2, y3 = model(x), convert(model, "3d")(boring(x, 8))
    assert y3.shape == (2, 4, 2, 4, 4)
    for d in range(y3.shape[2]):
        torch.testing.assert_close(y3[:, :, d], y2, rtol=1e-5, atol=1e-5)


def test_i3d_on_identical_slices_equals_2d_away_from_depth_borders():
    # Zero padding reads zeros beyond the first and last slice; two 3-convs and two 2-pools
    # reach one output slice from each border (depth 16 → 8 → 4), so slices 1 and 2 are exact.
    model = pure_net("zeros")
    x = torch.randn(1, 3, 16, 16)
    y2, y3 = model(x), convert(model, "3d")(boring(x, 16))
    for d in (1, 2):
        torch.testing.assert_close(y3[:, :, d], y2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y3[:, :, 0], y2, atol=1e-3)  # the border really differs


def test_i3d_unet_with_transposed_convs_on_identical_slices_equals_2d():
    # Transposed 2×2 stride-2 kernels are divided by ceil(K/s) = 1, not by K.
    model = small_unet()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "replicate"
    model = randomise(model).eval()
    x = torch.randn(1, 3, 16, 16)
    y2, y3 = model(x), convert(model, "3d")(boring(x, 4))
    for d in range(4):
        torch.testing.assert_close(y3[:, :, d], y2, rtol=1e-5, atol=1e-5)


def test_i3d_transposed_conv_with_overlapping_taps():
    conv = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1)
    x = torch.randn(1, 4, 5, 5)
    y3 = convert(conv, "3d")(boring(x, 6))
    assert y3.shape == (1, 6, 12, 10, 10)
    for d in range(1, 11):  # two depth taps meet at every output slice but the first and last
        torch.testing.assert_close(y3[:, :, d], conv(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Operators: what each 2D layer becomes in each mode
# --------------------------------------------------------------------------------------
def test_operator_table():
    model = Kitchen()
    acs, flat, i3d = (convert(model, m) for m in ("acs", "2.5d", "3d"))
    conv, dil, one, bn, inorm, ln = (acs.features[i] for i in (0, 3, 7, 1, 4, 9))
    assert isinstance(conv, ACSConv) and conv.padding_mode == "reflect"
    assert isinstance(dil, ACSConv) and (dil.dilation, dil.groups, dil.bias) == ((2, 2, 2), 2, None)
    assert type(one) is nn.Conv3d and one.kernel_size == (1, 1, 1)  # Table II: 1×1 → Conv3D 1×1×1
    assert type(bn) is nn.BatchNorm3d and torch.equal(bn.running_var, model.features[1].running_var)
    assert bn.num_batches_tracked == model.features[1].num_batches_tracked
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, 0.1, True, True)
    assert type(inorm) is nn.InstanceNorm3d and inorm.affine and inorm.track_running_stats
    assert type(ln) is LayerNorm3d and type(acs.features[8]) is nn.GroupNorm
    assert type(acs.features[10]) is nn.Dropout3d and acs.features[10].p == 0.3
    assert isinstance(acs.features[13], InflatedConvTranspose3d)
    assert acs.features[14].mode == "trilinear" and acs.features[14].scale_factor == 2.0
    assert flat.features[14].scale_factor == (1.0, 2.0, 2.0)
    for model3d, depth in ((flat, 1), (acs, 3), (i3d, 3)):  # Table II: pools {1, K}×K×K
        pool = model3d.features[6]
        assert type(pool) is nn.MaxPool3d and pool.ceil_mode
        assert (pool.kernel_size, pool.stride, pool.padding) == (
            (depth, 3, 3), (1 if depth == 1 else 2, 2, 2), (0 if depth == 1 else 1, 1, 1))
        avg = model3d.features[12]
        assert (avg.count_include_pad, avg.divisor_override) == (False, 3)
        assert model3d.pool.output_size == (1, 3, 3)  # flatten + Linear still see 6·3·3 values
    assert i3d.features[0].kernel_size == (3, 3, 3) and i3d.features[0].padding_mode == "reflect"
    assert flat.features[0].kernel_size == (1, 3, 3) and flat.features[0].padding == (0, 1, 1)
    assert flat.features[3].dilation == (1, 2, 2) and flat.features[3].groups == 2
    assert flat.features[15].padding == (1, 1, 1, 1, 0, 0)
    x = torch.randn(2, 3, 12, 24, 24)
    for model3d in (acs, i3d):
        assert model3d.eval()(x).shape == (2, 5)


def test_inflated_conv_transpose_is_a_conv_transpose3d_with_the_kernel_repeated():
    conv2d = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    conv = convert(conv2d, "acs")
    assert isinstance(conv, InflatedConvTranspose3d) and n_params(conv) == n_params(conv2d)
    x = torch.randn(1, 4, 3, 5, 5)
    weight = conv2d.weight.unsqueeze(2).repeat(1, 1, 3, 1, 1) / math.ceil(3 / 2)
    reference = F.conv_transpose3d(x, weight, conv2d.bias, 2, 1, 1, 2)
    torch.testing.assert_close(conv(x), reference)


@pytest.mark.parametrize("size", [(7, 7), 1])
def test_adaptive_pool_before_a_linear_keeps_the_flattened_size(size):
    torch.manual_seed(0)
    area = 49 if size == (7, 7) else 1
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(size), nn.Flatten(),
                          nn.Linear(4 * area, 10)).eval()
    for mode in CONVERSION_MODES:
        assert convert(model, mode)(torch.randn(2, 3, 5, 14, 14)).shape == (2, 10), mode


# --------------------------------------------------------------------------------------
# Real 3D use: classifier and segmentation outputs
# --------------------------------------------------------------------------------------
def test_converted_classifier_returns_n_by_classes():
    model = tv("resnet18").eval()
    assert convert(model, "acs")(torch.randn(2, 3, 8, 32, 32)).shape == (2, 1000)


def test_converted_segmentation_models_return_the_input_volume_size():
    y = convert(tv("deeplabv3_resnet50", aux_loss=True, num_classes=3).eval(), "acs")(torch.randn(1, 3, 4, 64, 64))
    assert {k: tuple(v.shape) for k, v in y.items()} == {"out": (1, 3, 4, 64, 64), "aux": (1, 3, 4, 64, 64)}
    unet = convert(small_unet().eval(), "soft_acs")
    assert unet.size_multiple == (4, 4, 4)
    assert unet(torch.randn(1, 3, 8, 16, 16)).shape == (1, 3, 8, 16, 16)
    with pytest.raises(TransferSegError, match="multiple of 4×4×4"):
        unet(torch.randn(1, 3, 6, 16, 16))
    assert convert(small_unet(), "2.5d").size_multiple == (1, 4, 4)  # 2.5D pools keep the depth


# --------------------------------------------------------------------------------------
# A copy, a real nn.Module
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["acs", "3d"])
def test_convert_returns_a_deep_copy(mode):
    model = randomise(tv("resnet18"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model3d = convert(model, mode)
    ours = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not ours & {t.untyped_storage().data_ptr() for t in (*model3d.parameters(), *model3d.buffers())}
    for p in model3d.parameters():
        p.add_(1.0)
    for b in model3d.buffers():
        b.add_(1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.conv1) is nn.Conv2d and model.conv1.weight.ndim == 4


def test_flags_requires_grad_and_a_module_used_twice_survive():
    model = tv("resnet18")
    model.train()
    model.layer1.eval()
    model.layer3[1].bn2.eval()
    model.fc.eval()
    model.conv1.weight.requires_grad_(False)
    model.layer2[0].bn1.bias.requires_grad_(False)
    shared = nn.Conv2d(3, 3, 3, padding=1)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    for mode in ("acs", "2.5d"):
        model3d = convert(model, mode)
        assert {n: m.training for n, m in model3d.named_modules()} == {n: m.training for n, m in model.named_modules()}
        assert {n: p.requires_grad for n, p in model3d.named_parameters()} == {
            n: p.requires_grad for n, p in model.named_parameters()}
        tied3d = convert(tied, mode)
        assert tied3d[0] is tied3d[2] and n_params(tied3d) == n_params(tied)


def test_state_dict_dtype_and_device_moves():
    model3d = convert(randomise(small_unet()).eval(), "acs")
    x = torch.randn(1, 3, 4, 16, 16)
    y = model3d(x)
    again = convert(small_unet(), "acs")
    again.load_state_dict(model3d.state_dict(), strict=True)
    torch.testing.assert_close(again.eval()(x), y)
    double = model3d.to(torch.float64)
    assert double.decoder[0].up.weight.dtype == torch.float64
    torch.testing.assert_close(double(x.double()).float(), y, rtol=1e-4, atol=1e-4)


def test_ddp_trains_a_converted_model():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with torch.enable_grad():
            ddp = nn.parallel.DistributedDataParallel(convert(small_unet(), "acs").train())
            loss = ddp(torch.randn(2, 3, 4, 16, 16)).square().mean()
            loss.backward()
        grads = [p.grad for p in ddp.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Refusals name the module
# --------------------------------------------------------------------------------------
def test_non_square_kernel_is_refused_for_acs_and_3d_but_not_2p5d():
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                   nn.Conv2d(4, 4, (3, 1), padding=(1, 0)))
    with pytest.raises(TransferSegError, match=r"^cannot convert features\.3 \(Conv2d with kernel \(3, 1\)\) to ACS: "):
        convert(model, "acs")
    with pytest.raises(TransferSegError, match=r"^cannot convert features\.3 \(Conv2d with kernel \(3, 1\)\) to 3D \(I3D\)"):
        convert(model, "3d")
    assert convert(model, "2.5d").features[3].kernel_size == (1, 3, 1)
    model.features[3] = nn.Conv2d(4, 4, 3, stride=(2, 1))
    with pytest.raises(TransferSegError, match=r"features\.3 \(Conv2d with stride \(2, 1\)\) to Mean-ACS"):
        convert(model, "mean_acs")


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return x * self.gamma


class Head1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x):
        return self.conv(x.flatten(2))


class Pool2dInForward(nn.Module):
    def forward(self, x):
        return F.avg_pool2d(x, 2)


class Double(nn.Module):  # parameter-free and dimension-agnostic: passes through
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("module, message", [
    (Head1d(), r"cannot convert 1\.conv \(Conv1d\) to ACS: a 1D convolution"),
    (Scale(), r"cannot convert 1 \(Scale holding gamma\) to ACS: it holds parameters"),
    (Pool2dInForward(), r"cannot convert 1 \(Pool2dInForward\) to ACS: its forward is 2D-only: "
                        r"Pool2dInForward\.forward calls F\.avg_pool2d"),
    (nn.PixelShuffle(2), r"cannot convert 1 \(PixelShuffle\) to ACS"),
    (nn.Upsample(size=(8, 8)), r"cannot convert 1 \(Upsample with size \(8, 8\)\) to ACS"),
    (nn.Upsample(scale_factor=2, mode="bicubic"), r"cannot convert 1 \(Upsample with mode 'bicubic'\)"),
])
def test_unconvertible_modules_are_refused_by_name(module, message):
    with pytest.raises(TransferSegError, match=message):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), module), "acs")


def test_parameter_free_custom_modules_pass_and_bad_modes_are_refused():
    model3d = convert(nn.Sequential(nn.Conv2d(3, 4, 3), Double()), "acs")
    assert type(model3d[1]) is Double and model3d(torch.randn(1, 3, 5, 5, 5)).shape == (1, 4, 3, 3, 3)
    with pytest.raises(TransferSegError, match="unknown conversion '4d'"):
        convert(model3d, "4d")
    with pytest.raises(TransferSegError, match=r"cannot convert 0 .*2\.5D.*\(and 1 more: 2\)"):
        convert(nn.Sequential(Scale(), nn.ReLU(), Scale()), "2.5d")


# --------------------------------------------------------------------------------------
# Sources, and the converted model saved as a model card
# --------------------------------------------------------------------------------------
def test_convert_from_source_loads_local_safetensors_weights_strictly(tmp_path):
    model = randomise(tv("resnet18"), seed=3)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    model3d, info = convert_from_source("torchvision:resnet18", "2.5d", weights_path=weights)
    state3d = model3d.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state3d[key].squeeze(2) if value.ndim == 4 else state3d[key], value, rtol=0, atol=0)
    assert info["mode"] == "2.5d" and info["pretrained_weights"]["path"] == str(weights)
    assert info["parameters_2d"] == info["parameters_3d"] == n_params(model)

    # A new head: fc is left freshly initialised, everything else must still fit exactly.
    model3d, info = convert_from_source("torchvision:resnet18", "acs", num_classes=4, weights_path=weights)
    assert info["reinitialised"] == ["fc.weight", "fc.bias"] and model3d.fc.out_features == 4
    torch.testing.assert_close(model3d.layer4[1].conv2.weight, model.layer4[1].conv2.weight, rtol=0, atol=0)

    with pytest.raises(TransferSegError, match="do not fit torchvision:resnet34"):
        convert_from_source("torchvision:resnet34", "acs", weights_path=weights)
    (tmp_path / "resnet18.pth").write_bytes(b"\x80\x02whatever")
    with pytest.raises(TransferSegError, match="refusing to load a PyTorch pickle"):
        convert_from_source("torchvision:resnet18", "acs", weights_path=tmp_path / "resnet18.pth")
    with pytest.raises(TransferSegError, match="no model named 'resnet19'"):
        convert_from_source("torchvision:resnet19", "acs")
    with pytest.raises(TransferSegError, match="say which 2D architecture"):
        convert_from_source(str(weights), "acs")
    model3d, info = convert_from_source(str(weights), "3d", architecture="torchvision:resnet18")
    assert info["pretrained_weights"]["sha256"] and model3d.conv1.weight.shape == (64, 3, 7, 7, 7)


def test_a_converted_model_is_a_model_card_that_load_model_reads_back(tmp_path):
    """The one weights format: safetensors + a model card whose architecture is "converted", the
    conversion recorded in the card, the outputs of the model loaded back identical."""
    model3d, _ = convert_from_source("transferseg:unet2d", "soft_acs", num_classes=2,
                                     config={"base_channels": 4, "levels": 3})
    randomise(model3d)
    card_path = save_converted(model3d, tmp_path / "unet.safetensors")
    assert card_path == tmp_path / "unet.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.json", "unet.safetensors"]  # nothing partial
    card = read_card(card_path)  # checked like any card
    assert card["architecture"] == {"name": "converted", "config": {
        "source": "unet2d", "config": {"base_channels": 4, "levels": 3, "out_channels": 2}, "to": "soft_acs"}}
    record = card["training"]["converted_from"]
    assert (record["source"], record["mode"], record["num_classes"]) == ("transferseg:unet2d", "soft_acs", 2)
    assert record["parameters_3d"] == n_params(model3d) and record["reinitialised"] == []
    assert card["weights"]["sha256"] == hashlib.sha256((tmp_path / "unet.safetensors").read_bytes()).hexdigest()
    loaded = load_model(tmp_path / "unet.safetensors")
    x = torch.randn(1, 3, 4, 16, 16)
    torch.testing.assert_close(loaded.network(x), model3d.eval()(x), rtol=0, atol=0)
    with pytest.raises(TransferSegError, match="never pickle"):
        save_converted(model3d, tmp_path / "unet.pt")
    with pytest.raises(TransferSegError, match="in-memory .*Sequential"):  # no card can say how to rebuild it
        save_converted(convert(nn.Sequential(nn.Conv2d(1, 2, 3)), "acs"), tmp_path / "seq.safetensors")


def test_pretrained_weights_with_a_new_head_round_trip_through_the_card(tmp_path):
    model = randomise(tv("resnet18"), seed=3)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    model3d, info = convert_from_source("torchvision:resnet18", "acs", num_classes=4, weights_path=weights)
    card = json.loads(save_converted(model3d, tmp_path / "r18_acs.safetensors", info).read_text(encoding="utf-8"))
    record = card["training"]["converted_from"]
    assert record["reinitialised"] == ["fc.weight", "fc.bias"]
    assert record["pretrained_weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert card["architecture"]["config"] == {"source": "torchvision:resnet18", "config": {"num_classes": 4},
                                              "to": "acs"}
    loaded = load_model(tmp_path / "r18_acs.json")
    x = torch.randn(2, 3, 16, 16, 16)
    torch.testing.assert_close(loaded.network(x), model3d.eval()(x), rtol=0, atol=0)


def test_convert_from_source_reads_a_transferseg_model_card(tmp_path):
    net = randomise(small_unet(), seed=5).eval()
    card = {"name": "unet2d-demo", "version": "0.0.1", "task": "segmentation",
            "labels": [{"name": "liver", "label": 1, "color": [0.8, 0.4, 0.3]}],
            "architecture": {"name": "unet2d", "config": net.config},
            "preprocessing": {"hu_window": [-200, 250]}, "patch_size": [1, 16, 16]}
    save_model(net, card, tmp_path)
    model3d, info = convert_from_source(str(tmp_path / "unet2d-demo.safetensors"), "2.5d")
    assert (info["architecture"], info["config"]) == ("unet2d", net.config)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model3d(x[:, :, None])[:, :, 0], net(x), rtol=1e-5, atol=1e-5)
    save_converted(model3d, tmp_path / "unet3d.safetensors")
    loaded = load_model(tmp_path / "unet3d.safetensors")
    torch.testing.assert_close(loaded.network(x[:, :, None]), model3d(x[:, :, None]), rtol=0, atol=0)
    # the source card's task, labels, preprocessing and patch carry over: a model the pipeline can run
    assert {k: loaded.card[k] for k in ("task", "labels", "preprocessing", "patch_size")} == \
        {k: card[k] for k in ("task", "labels", "preprocessing", "patch_size")}
    assert loaded.card["architecture"]["config"] == {"source": "unet2d", "config": net.config, "to": "2.5d"}


def test_convert_command_writes_weights_and_their_model_card(tmp_path):
    out = tmp_path / "unet_acs.safetensors"
    config = {"in_channels": 3, "out_channels": 2, "base_channels": 4, "levels": 3}
    result = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "convert", "--from", "transferseg:unet2d",
                             "--config", json.dumps(config), "--to", "acs", "-o", str(out)],
                            capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["training"]["converted_from"]
    assert record["mode"] == "acs" and record["parameters_2d"] == record["parameters_3d"]
    assert n_params(load_model(out).network) == record["parameters_3d"]
    bad = subprocess.run([sys.executable, "-m", "TransferSegLib.cli", "convert", "--from", str(tmp_path / "x.pth"),
                          "--to", "acs", "-o", str(tmp_path / "y.safetensors")], capture_output=True, text=True, encoding="utf-8",
                         timeout=300)
    assert bad.returncode == 2 and "pickle" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
