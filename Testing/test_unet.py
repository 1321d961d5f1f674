"""Tests for the U-Net baselines (TransferSegLib/nets/unet.py).

Parameter counts are checked against sums written out by hand from the papers' figures, not
from the module's own channel logic. The 3D U-Net paper (Çiçek et al. 2016, sec. 2) states
19,069,955 parameters for its 3-channel, 3-label network; that number is exactly the convs'
weights and biases with bias-free up-convolutions and no BatchNorm parameters, so ours
(up-convolution biases, BatchNorm weights and biases) must be that plus 896 plus 4,672.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from conftest import randomize_bn
from TransferSegLib.nets import ARCHITECTURES, build_network
from TransferSegLib.nets.unet import MultiSliceUNet2D, SliceStack2D, UNet2D, UNet3D
from TransferSegLib.volume import TransferSegError

SMALL_3D = {"in_channels": 1, "out_channels": 3, "base_channels": 8, "levels": 3}
SMALL_2D = {"in_channels": 3, "out_channels": 2, "base_channels": 8, "levels": 3}


def count(model):
    return sum(p.numel() for p in model.parameters())


def conv(kernel_volume, cin, cout):
    """Weights + biases of one conv (or transposed conv)."""
    return kernel_volume * cin * cout + cout


def bn(channels):
    return 2 * channels


# --------------------------------------------------------------------------- parameter counts


def test_unet3d_paper_parameter_count():
    # Fig. 1 of Çiçek et al. 2016, 3 input channels, 3 labels; 3×3×3 convs (27), 2×2×2 up (8).
    analysis = [(3, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    synthesis = [(256 + 512, 256), (256, 256), (128 + 256, 128), (128, 128), (64 + 128, 64), (64, 64)]
    convs = sum(conv(27, a, b) for a, b in analysis + synthesis)
    norms = sum(bn(b) for _, b in analysis + synthesis)
    ups = conv(8, 512, 512) + conv(8, 256, 256) + conv(8, 128, 128)
    head = conv(1, 64, 3)
    expected = convs + norms + ups + head
    model = UNet3D(in_channels=3, out_channels=3)
    print(f"\nUNet3D paper config (in 3, out 3): {count(model):,} parameters (hand: {expected:,})")
    assert count(model) == expected == 19_069_955 + (512 + 256 + 128) + norms
    assert norms == 4_672
    # The library default has one input channel (CT): 2 fewer input channels in the first conv.
    assert count(UNet3D()) == expected - 27 * 2 * 32
    print(f"UNet3D default (in 1, out 3): {count(UNet3D()):,}")


def test_unet3d_small_parameter_count():
    analysis = [(1, 8), (8, 16), (16, 16), (16, 32), (32, 32), (32, 64)]
    synthesis = [(32 + 64, 32), (32, 32), (16 + 32, 16), (16, 16)]
    expected = (sum(conv(27, a, b) + bn(b) for a, b in analysis + synthesis)
                + conv(8, 64, 64) + conv(8, 32, 32) + conv(1, 16, 3))
    model = UNet3D(**SMALL_3D)
    print(f"\nUNet3D small {SMALL_3D}: {count(model):,} parameters")
    assert count(model) == expected


def test_unet2d_paper_parameter_count():
    # Fig. 1 of Ronneberger et al. 2015: 3×3 convs (9), 2×2 up-convs halving channels (4).
    analysis = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                (256, 512), (512, 512), (512, 1024), (1024, 1024)]
    synthesis = [(512 + 512, 512), (512, 512), (256 + 256, 256), (256, 256),
                 (128 + 128, 128), (128, 128), (64 + 64, 64), (64, 64)]
    ups = conv(4, 1024, 512) + conv(4, 512, 256) + conv(4, 256, 128) + conv(4, 128, 64)
    convs = sum(conv(9, a, b) for a, b in analysis + synthesis)
    norms = sum(bn(b) for _, b in analysis + synthesis)
    expected = convs + norms + ups + conv(1, 64, 3)
    model = UNet2D()
    print(f"\nUNet2D paper config (in 3, out 3): {count(model):,} parameters (hand: {expected:,})")
    assert count(model) == expected
    # The 2015 network itself: 1 input, 2 classes, no BatchNorm -- the usual "31 M".
    original = expected - norms - 9 * 2 * 64 - conv(1, 64, 1)
    print(f"UNet2D as in 2015 (in 1, out 2, no BN): {original:,}")
    assert original == 31_030_658
    assert count(UNet2D(in_channels=1, out_channels=2)) == original + norms


def test_unet2d_small_parameter_count():
    analysis = [(3, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]
    synthesis = [(16 + 16, 16), (16, 16), (8 + 8, 8), (8, 8)]
    expected = (sum(conv(9, a, b) + bn(b) for a, b in analysis + synthesis)
                + conv(4, 32, 16) + conv(4, 16, 8) + conv(1, 8, 2))
    model = UNet2D(**SMALL_2D)
    print(f"\nUNet2D small {SMALL_2D}: {count(model):,} parameters")
    assert count(model) == expected
    # The multi-slice wrapper adds no parameters.
    assert count(MultiSliceUNet2D(**SMALL_2D)) == expected


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_other_norms_build_run_and_count_like_batchnorm(norm):
    model = UNet3D(**SMALL_3D, norm=norm)
    assert count(model) == count(UNet3D(**SMALL_3D))  # affine norms: 2 parameters per channel
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.randn(2, 1, 8, 8, 8)).shape == (2, 3, 8, 8, 8)


# --------------------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("shape", [(1, 1, 16, 32, 32), (2, 1, 4, 8, 12), (1, 1, 24, 8, 16)])
def test_unet3d_small_output_shapes(shape):
    model = UNet3D(**SMALL_3D)
    assert model.size_multiple == (4, 4, 4)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:])


def test_full_size_forward():
    torch.manual_seed(0)
    model3d = UNet3D().eval()
    assert model3d.size_multiple == (8, 8, 8)
    with torch.no_grad():
        assert model3d(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    model2d = UNet2D().eval()
    assert model2d.size_multiple == (16, 16)
    with torch.no_grad():
        assert model2d(torch.randn(1, 3, 32, 48)).shape == (1, 3, 32, 48)
    assert MultiSliceUNet2D().size_multiple == (1, 16, 16)


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (2, 3, 8, 24), (2, 3, 4, 4)])
def test_unet2d_small_output_shapes(shape):
    model = UNet2D(**SMALL_2D)
    assert model(torch.randn(shape)).shape == (shape[0], 2, *shape[2:])


def test_wrong_spatial_size_is_a_clear_error():
    with pytest.raises(TransferSegError, match=r"16×30×32 is not a multiple of 4×4×4"):
        UNet3D(**SMALL_3D)(torch.randn(1, 1, 16, 30, 32))
    with pytest.raises(TransferSegError, match=r"18×16 is not a multiple of 4×4"):
        UNet2D(**SMALL_2D)(torch.randn(1, 3, 18, 16))
    # The adapter takes any depth but checks H and W against the 2D network's multiple.
    with pytest.raises(TransferSegError, match=r"5×16×10 is not a multiple of 1×4×4"):
        MultiSliceUNet2D(**SMALL_2D)(torch.randn(1, 1, 5, 16, 10))
    with pytest.raises(TransferSegError, match="expects 1 input channel"):
        UNet3D(**SMALL_3D)(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(TransferSegError, match="expects a 5D tensor"):
        UNet3D(**SMALL_3D)(torch.randn(1, 8, 8, 8))


def test_bad_configs_are_clear_errors():
    with pytest.raises(TransferSegError, match="norm must be one of"):
        build_network("unet3d", {"norm": "layer"})
    with pytest.raises(TransferSegError, match="levels must be a positive integer"):
        build_network("unet2d", {"levels": 0})
    with pytest.raises(TransferSegError, match="odd number of slices"):
        build_network("unet2d_multislice", {"in_channels": 4})
    with pytest.raises(TransferSegError, match="cannot be built"):
        build_network("unet3d", {"depth": 4})


# --------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("model", [UNet3D(**SMALL_3D), UNet2D(**SMALL_2D), MultiSliceUNet2D(**SMALL_2D)],
                         ids=["unet3d", "unet2d", "multislice"])
def test_parameter_groups_cover_every_parameter_once(model):
    groups = model.parameter_groups()
    assert set(groups) == {"encoder", "decoder"}
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    inner = getattr(model, "net", model)
    assert id(inner.encoder[0][0].weight) in {id(p) for p in groups["encoder"]}
    assert id(inner.head.weight) in {id(p) for p in groups["decoder"]}
    assert id(inner.decoder[0].up.weight) in {id(p) for p in groups["decoder"]}


# --------------------------------------------------------------------------- slice stacking


def test_slice_stack_equals_2d_net_on_hand_built_stacks():
    torch.manual_seed(1)
    net = randomize_bn(UNet2D(**SMALL_2D)).eval()
    adapter = SliceStack2D(net, slice_batch=4).eval()  # 2 × 7 = 14 slices: chunks cross samples
    x = torch.randn(2, 1, 7, 8, 12)
    with torch.no_grad():
        y = adapter(x)
        assert y.shape == (2, 2, 7, 8, 12)
        s = x[:, 0]  # (N, D, H, W)
        for b in range(2):
            stacks = [torch.stack([s[b, 0], s[b, 0], s[b, 1]])]  # first: edge replicated
            stacks += [s[b, d - 1:d + 2] for d in range(1, 6)]
            stacks += [torch.stack([s[b, 5], s[b, 6], s[b, 6]])]  # last: edge replicated
            for d, stack in enumerate(stacks):
                expected = net(stack[None])[0]
                torch.testing.assert_close(y[b, :, d], expected, atol=1e-5, rtol=1e-5)
        # A batch equals its samples run one at a time.
        torch.testing.assert_close(y, torch.cat([adapter(x[:1]), adapter(x[1:])]), atol=1e-5, rtol=1e-5)


def test_slice_stack_five_slices_and_any_2d_network():
    torch.manual_seed(2)
    net = torch.nn.Conv2d(5, 2, 3, padding=1)  # any 2D network: no size_multiple, no groups
    adapter = SliceStack2D(net, n_slices=5, slice_batch=3)
    assert adapter.size_multiple == (1, 1, 1)
    assert list(adapter.parameter_groups()) == ["network"]
    assert list(adapter.state_dict()) == ["net.weight", "net.bias"]
    x = torch.randn(1, 1, 3, 5, 6)  # fewer slices than the stack: clamped at both ends
    s = x[0, 0]
    with torch.no_grad():
        y = adapter(x)
        for d, order in enumerate([(0, 0, 0, 1, 2), (0, 0, 1, 2, 2), (0, 1, 2, 2, 2)]):
            torch.testing.assert_close(y[0, :, d], net(s[list(order)][None])[0], atol=1e-5, rtol=1e-5)


def test_slice_stack_trains():
    model = MultiSliceUNet2D(**SMALL_2D, slice_batch=5)
    model(torch.randn(1, 1, 4, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --------------------------------------------------------------------------- registry round trips


def test_build_network_state_dict_round_trip():
    cfg = json.loads(json.dumps(SMALL_3D))
    model = randomize_bn(build_network("unet3d", cfg)).eval()
    blob = save_safetensors(model.state_dict())
    rebuilt = build_network("unet3d", cfg)
    result = rebuilt.load_state_dict(load_safetensors(blob), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    rebuilt.eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("name,cfg,shape", [
    ("unet3d", {**SMALL_3D, "norm": "group"}, (1, 1, 8, 8, 8)),
    ("unet2d", SMALL_2D, (1, 3, 8, 8)),
    ("unet2d_multislice", {**SMALL_2D, "slice_batch": 2}, (1, 1, 3, 8, 8)),
])
def test_every_architecture_builds_from_a_json_config(name, cfg, shape):
    cfg = json.loads(json.dumps(cfg))
    model = build_network(name, cfg)
    assert ARCHITECTURES[name] is type(model) and model.architecture_name == name
    assert {k: model.config[k] for k in cfg} == cfg
    # The model's own config rebuilds the same architecture (what a model card stores).
    twin = build_network(name, json.loads(json.dumps(model.config)))
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    out = model.eval()(torch.randn(shape))
    assert out.shape[1] == cfg["out_channels"] and out.shape[2:] == shape[2:]
    assert math.isfinite(out.sum().item())
