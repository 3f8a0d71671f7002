"""Tests of the 2D-3D+3x3x3 network (``scripts.networks.HybridUNet2D3D``).

Only the paper-window shape check uses the full-width network; every other test uses small ``features``.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from scripts.networks import HybridUNet2D3D

PAPER_PARAMS = {"full": 10.3e6, "no_3x3x3": 9.9e6, "no_pyramid": 7.9e6}  # Guay et al. 2020, Table 1(b)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def small(**kwargs) -> HybridUNet2D3D:
    torch.manual_seed(0)
    kwargs.setdefault("features", 8)
    return HybridUNet2D3D(**kwargs)


@pytest.fixture(scope="module")
def default_net() -> HybridUNet2D3D:
    torch.manual_seed(0)
    return HybridUNet2D3D()


def test_default_parameter_count(default_net):
    count = n_params(default_net)
    print(f"\nHybridUNet2D3D default parameter count: {count:,}")
    assert count == 10_267_022
    assert abs(count - PAPER_PARAMS["full"]) / PAPER_PARAMS["full"] < 0.05


def test_ablation_parameter_counts(default_net):
    full = n_params(default_net)
    no_3x3x3 = HybridUNet2D3D(conv3d_blocks=False)
    no_pyramid = HybridUNet2D3D(pyramid=False)
    c_no3, c_nopyr = n_params(no_3x3x3), n_params(no_pyramid)
    print(f"\nno 3x3x3 convs: {c_no3:,}  no 3D pyramid: {c_nopyr:,}")
    assert c_no3 < full and c_nopyr < full
    assert abs(c_no3 - PAPER_PARAMS["no_3x3x3"]) / PAPER_PARAMS["no_3x3x3"] < 0.05
    assert abs(c_nopyr - PAPER_PARAMS["no_pyramid"]) / PAPER_PARAMS["no_pyramid"] < 0.05
    # "no 3x3x3 convs" keeps every layer and width: only the z extent of the extra kernels shrinks 3 -> 1
    full_convs = [m for m in default_net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    abl_convs = [m for m in no_3x3x3.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert [(m.in_channels, m.out_channels) for m in full_convs] == [(m.in_channels, m.out_channels) for m in abl_convs]
    kernels_3d = [m for m in full_convs if tuple(m.kernel_size) == (3, 3, 3)]
    assert len(kernels_3d) == 4 + 3 + 5  # 2 encoder + 2 decoder extra convs, pyramid levels of 3 and 5 convs
    assert sum(tuple(m.kernel_size) == (3, 3, 3) for m in abl_convs) == 3 + 5  # only the pyramid stays 3D


def test_paper_window_shape(default_net):
    """The paper's (5, 300, 300) window shrunk to xy divisible by 8: (X, Y, Z) = (296, 296, 5), z last."""
    net = default_net.eval()
    assert net.spatial_divisor == 8
    with torch.inference_mode():
        out = net(torch.randn(1, 1, 296, 296, 5))
    assert out.shape == (1, 7, 296, 296, 5)
    assert torch.isfinite(out).all()


def test_train_and_eval_output_shapes():
    net = small()
    x = torch.randn(2, 1, 16, 24, 3)
    net.train()
    assert net(x).shape == (2, 2, 7, 16, 24, 3)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 7, 16, 24, 3)
    no_ds = small(deep_supervision=False).train()
    assert no_ds(x).shape == (2, 7, 16, 24, 3)


def test_no_pyramid_returns_2d_logits_in_both_modes():
    net = small(pyramid=False)
    x = torch.randn(1, 1, 16, 16, 4)
    assert net.train()(x).shape == (1, 7, 16, 16, 4)
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 7, 16, 16, 4)
        # the output is exactly the 2D predictor's logits
        assert torch.equal(net(x), net.predictor_2d(net.net_2d(x)))
    assert net.net_3d is None and net.predictor_3d is None


def test_deep_supervision_stacks_3d_then_2d():
    net = small().train()
    x = torch.randn(1, 1, 16, 16, 3)
    torch.manual_seed(1)
    out = net(x)
    with torch.no_grad():
        feats = net.net_2d(x)
        logits_2d = net.predictor_2d(feats)
        logits_3d = net.predictor_3d(net.net_3d(torch.cat([logits_2d, feats], 1)))
        torch.testing.assert_close(out[:, 0], logits_3d)
        torch.testing.assert_close(out[:, 1], logits_2d)
        torch.testing.assert_close(net.eval()(x), logits_3d)


@pytest.mark.parametrize("z", [1, 2, 7])
def test_z_is_never_pooled(z):
    net = small(features=4).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 8, 8, z)).shape == (1, 7, 8, 8, z)


def test_options_change_structure():
    net = small(in_channels=2, out_channels=3, num_scales=2, convs_per_block=3, pyramid_convs=(2, 2, 1))
    assert net.spatial_divisor == 4
    assert len(net.net_2d.encoder) == 2 and len(net.net_2d.decoder) == 2
    assert len(net.net_3d.levels) == 3 and [len(lv.block) for lv in net.net_3d.levels] == [2, 2, 1]
    assert [lv.block[0].conv.out_channels for lv in net.net_3d.levels] == [8, 16, 32]  # features * 2**level
    assert len(net.net_2d.encoder[0]) == 1 + 3  # extra 3x3x3 conv + convs_per_block
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 2, 8, 8, 2)).shape == (1, 3, 8, 8, 2)
    custom = small(pyramid_features=(8, 24))
    assert custom.net_3d.levels[1].block[0].conv.out_channels == 24
    with pytest.raises(ValueError, match="same length"):
        small(pyramid_features=(8,))


def test_no_shared_weights_and_distinct_modules():
    net = small()
    named = list(net.named_parameters(remove_duplicate=False))
    assert len(named) == len(list(net.parameters()))
    ptrs = [p.data_ptr() for _, p in named]
    assert len(ptrs) == len(set(ptrs)), "two parameters share storage (e.g. [conv] * n)"
    modules = [m for _, m in net.named_modules(remove_duplicate=False) if not isinstance(m, (nn.ReLU, nn.Identity))]
    ids = [id(m) for m in modules if any(True for _ in m.parameters(recurse=False))]
    assert len(ids) == len(set(ids)), "a module with weights is registered twice"


def test_forward_creates_no_modules(monkeypatch):
    net = small().train()
    created = []
    original = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        created.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    keys = set(net.state_dict())
    net(torch.randn(1, 1, 16, 16, 3))
    assert created == [], f"modules created inside forward: {created}"
    assert set(net.state_dict()) == keys


def test_every_parameter_gets_a_gradient():
    net = small().train()
    x = torch.randn(2, 1, 16, 16, 3)
    target = torch.randint(0, 7, (2, 16, 16, 3))
    out = net(x)
    loss = nn.functional.cross_entropy(out[:, 0], target) + 0.33 * nn.functional.cross_entropy(out[:, 1], target)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_xavier_uniform_init_and_zero_bias():
    net = small()
    for m in net.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            rf = math.prod(m.kernel_size)
            fan_in, fan_out = m.weight.shape[1] * rf, m.weight.shape[0] * rf
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound + 1e-7
            assert m.weight.abs().max() > 0.5 * bound  # really uniform on [-bound, bound], not a smaller default
            assert torch.count_nonzero(m.bias) == 0


def test_l2_parameter_groups_cover_every_parameter_once():
    net = small()
    groups = net.l2_parameter_groups()
    assert [g["name"] for g in groups] == ["net_2d", "net_3d", "predictors"]
    lambdas = {"net_2d": 10**-4.7, "net_3d": 1e-5, "predictors": 1e-9}
    for g in groups:
        assert g["weight_decay"] == pytest.approx(2 * lambdas[g["name"]], rel=1e-12)
        assert g["l2_lambda"] == pytest.approx(lambdas[g["name"]], rel=1e-12)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert set(ids) == {id(p) for p in net.parameters()}
    pred = {id(p) for p in [*net.predictor_2d.parameters(), *net.predictor_3d.parameters()]}
    assert {id(p) for p in groups[2]["params"]} == pred and len(pred) == 4
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.net_3d.parameters()}
    torch.optim.Adam(groups, lr=1e-3, betas=(1 - 10**-1.5, 1 - 10**-2.1), eps=1e-7)  # accepted as is
    no_pyr = small(pyramid=False).l2_parameter_groups(lambda_2d=0.5, lambda_pred=0.25)
    assert [(g["name"], g["weight_decay"]) for g in no_pyr] == [("net_2d", 1.0), ("predictors", 0.5)]


def _tiny_double_net() -> HybridUNet2D3D:
    torch.manual_seed(0)
    return HybridUNet2D3D(features=2, out_channels=3, num_scales=1, pyramid_convs=(1, 1)).double().train()


def _data_loss(net: HybridUNet2D3D, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return nn.functional.cross_entropy(out[:, 0], y) + 0.33 * nn.functional.cross_entropy(out[:, 1], y)


def _l2_penalty(net: HybridUNet2D3D, lambdas: dict) -> torch.Tensor:
    return sum(lambdas[g["name"]] * sum((p**2).sum() for p in g["params"]) for g in net.l2_parameter_groups())


def test_weight_decay_equals_gradient_of_l2_term():
    """SGD step with the groups' weight_decay == gradient step on loss + sum_g lambda_g ||theta_g||^2."""
    lambdas = {"net_2d": 0.03, "net_3d": 0.07, "predictors": 0.11}  # large enough to matter numerically
    x = torch.randn(1, 1, 4, 4, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (1, 4, 4, 2))
    lr = 0.1

    net_a = _tiny_double_net()
    net_b = copy.deepcopy(net_a)
    groups = net_a.l2_parameter_groups(lambdas["net_2d"], lambdas["net_3d"], lambdas["predictors"])
    opt = torch.optim.SGD(groups, lr=lr)
    _data_loss(net_a, x, y).backward()
    opt.step()

    total = _data_loss(net_b, x, y) + _l2_penalty(net_b, lambdas)
    grads = torch.autograd.grad(total, list(net_b.parameters()))
    with torch.no_grad():
        for p, g in zip(net_b.parameters(), grads):
            p -= lr * g
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=name)

    # and with Adam (coupled decay): two steps identical to Adam without decay on the explicit L2 loss
    net_c, net_d = _tiny_double_net(), _tiny_double_net()
    groups_c = net_c.l2_parameter_groups(lambdas["net_2d"], lambdas["net_3d"], lambdas["predictors"])
    opt_c = torch.optim.Adam(groups_c, lr=1e-2)
    groups_d = net_d.l2_parameter_groups()
    for g in groups_d:
        g["weight_decay"] = 0.0
    opt_d = torch.optim.Adam(groups_d, lr=1e-2)
    for _ in range(2):
        opt_c.zero_grad()
        _data_loss(net_c, x, y).backward()
        opt_c.step()
        opt_d.zero_grad()
        (_data_loss(net_d, x, y) + _l2_penalty(net_d, lambdas)).backward()
        opt_d.step()
    for pc, pd in zip(net_c.parameters(), net_d.parameters()):
        torch.testing.assert_close(pc, pd, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("pyramid", [True, False])
def test_torchscript_script_and_trace_match_eager(pyramid):
    net = small(features=4, pyramid=pyramid).eval()
    x = torch.randn(1, 1, 16, 16, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* is deprecated in recent torch
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x)
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(scripted(x), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(traced(x), ref, atol=1e-5, rtol=0)
        x2 = torch.randn(2, 1, 8, 24, 2)  # the scripted graph is not shape-specialised
        torch.testing.assert_close(scripted(x2), net(x2), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="divisible by 8"):
        scripted(torch.randn(1, 1, 12, 16, 3))


def test_invalid_xy_shape_raises_clear_error():
    net = small(features=4).eval()
    with pytest.raises(ValueError, match=r"\(300, 300, 5\).*divisible by 8.*\(296, 296, 5\)"):
        net(torch.randn(1, 1, 300, 300, 5))
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.randn(1, 1, 16, 20, 5))
    with pytest.raises(ValueError, match="5D"):
        net(torch.randn(1, 16, 16, 5))


def test_autocast_bfloat16_cpu():
    # xy = 32 keeps the bottleneck at 4x4: torch 2.13's CPU bf16 conv3d weight gradient is wrong (NaN/garbage)
    # when the first spatial dim of a 3-wide kernel is exactly 2 (e.g. a 16-wide window with 3 poolings)
    net = small(features=4).train()
    x = torch.randn(1, 1, 32, 32, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 7, 32, 32, 3)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        ref = net(x)
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net = small(features=4).eval()
    x = torch.randn(1, 1, 16, 16, 3)
    with torch.no_grad():
        ref = net(x)
        out = net.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert net(x.cuda()).shape == (1, 7, 16, 16, 3)


def test_section_wise_2d_runs_a_2d_network_on_every_section():
    from scripts.baselines import SectionWise2D, unet_with_deep_dropout

    net2d = unet_with_deep_dropout(in_channels=3, out_channels=5, features=(4, 4, 8, 8, 16, 4)).eval()
    net = SectionWise2D(net2d).eval()
    x = torch.randn(2, 3, 32, 48, 4)
    out = net(x)
    assert out.shape == (2, 5, 32, 48, 4)
    torch.testing.assert_close(out[1, :, :, :, 2], net2d(x[1:2, :, :, :, 2])[0], atol=1e-5, rtol=1e-5)
    dropouts = [m for m in net2d.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net2d.modules())


@pytest.mark.parametrize("norm", [None, "instance", "batch", "group"])
@pytest.mark.parametrize("upsample", ["transposed", "interpolate"])
def test_norm_and_upsample_options_train_and_script(norm, upsample):
    net = small(norm=norm, upsample=upsample, out_channels=3)
    x = torch.randn(2, 1, 32, 32, 3)
    out = net(x)
    assert out.shape == (2, 2, 3, 32, 32, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), net(x))


def test_single_section_fast_path_equals_the_3d_convolutions(monkeypatch):
    """On Z = 1 the 3D convolutions run as 2D ones; the result equals nn.Conv3d's."""
    from scripts.layers import SectionConv3d

    net = small(norm="instance", upsample="interpolate").eval()
    x = torch.randn(1, 1, 32, 40, 1)
    fast = net(x)
    monkeypatch.setattr(SectionConv3d, "forward", lambda self, t: self._conv_forward(t, self.weight, self.bias))
    torch.testing.assert_close(fast, net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factor", [(2, 2, 1), (4, 4, 1), (2, 3, 2)])
def test_inference_pooling_and_up_sampling_equal_the_library_modules(factor):
    """The eval-mode strided-maxima pooling and broadcast up-sampling give PyTorch's values and gradients."""
    from scripts.layers import NearestUpsample3d, StridedMaxPool3d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 14, 5)  # sizes that leave trailing voxels in no pooling window
    reference_pool = nn.MaxPool3d(factor, factor)
    reference_up = nn.Upsample(scale_factor=tuple(float(f) for f in factor), mode="nearest")
    pool, up = StridedMaxPool3d(factor).eval(), NearestUpsample3d(factor).eval()
    assert torch.equal(pool(x), reference_pool(x))
    assert torch.equal(up(x), reference_up(x))
    channels_last = up(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.equal(channels_last, reference_up(x))
    assert channels_last.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(torch.jit.script(pool)(x.to(torch.bfloat16)), reference_pool(x.to(torch.bfloat16)))
    trained = x.clone().requires_grad_()
    pool(trained).sum().backward()
    expected = x.clone().requires_grad_()
    reference_pool(expected).sum().backward()
    assert torch.equal(trained.grad, expected.grad)


@pytest.mark.parametrize("sections", [1, 3])
@pytest.mark.parametrize("channels,size", [(4, 9), (16, 40)])  # a channel-first copy / the channels-last kernel
def test_instance_group_norm_equals_instance_norm(sections, channels, size):
    """The group-norm form normalises as nn.InstanceNorm3d does, values and gradients alike, and keeps the layout."""
    from scripts.layers import InstanceGroupNorm3d

    torch.manual_seed(0)
    reference = nn.InstanceNorm3d(channels, affine=True)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    norm = InstanceGroupNorm3d(channels, affine=True)
    norm.load_state_dict(reference.state_dict())
    x = torch.randn(2, channels, size, size, sections) * 3 + 1
    fast, expected = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(norm(fast), reference(expected))
    (norm(fast) * x).sum().backward()
    (reference(expected) * x).sum().backward()
    torch.testing.assert_close(fast.grad, expected.grad)
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(torch.jit.script(norm.eval())(channels_last), reference(x))
    assert norm(channels_last).is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inplace_relu_is_the_relu_in_place_with_and_without_gradients(dtype):
    from scripts.layers import InplaceReLU

    torch.manual_seed(0)
    values = torch.cat([torch.randn(2, 4, 9, 7, 3).flatten() * 5, torch.tensor([0.0, -0.0, float("inf"), -1e-30])])
    x = values.to(dtype).reshape(1, 1, -1, 1, 1).contiguous(memory_format=torch.channels_last_3d)
    relu = InplaceReLU()
    with torch.inference_mode():
        y = x.clone()
        assert relu(y) is y
        assert torch.equal(y, torch.relu(x))
    leaf = x.float().requires_grad_()
    inner = leaf.to(dtype) * 1  # an activation that is not a leaf, as in a network
    relu(inner).sum().backward()
    torch.testing.assert_close(leaf.grad, (x > 0).float())
    assert torch.jit.script(relu)(x.clone()).equal(torch.relu(x))
    assert all(isinstance(m.adn.A, InplaceReLU) for m in HybridUNet2D3D(features=4).modules() if hasattr(m, "adn"))


@pytest.mark.parametrize("batch,stem_stride", [(2, 1), (1, 2)])  # (1, 2): one whole section, the shipped network
def test_channels_last_weights_keep_single_section_activations_channels_last(batch, stem_stride):
    """With channels-last weights every convolution after the stem sees a channels-last input (oneDNN copies any
    other layout), the 1x1x1 predictors included, and the logits equal those of the channel-first network."""
    from scripts.layers import SectionConv3d, to_channels_last_3d

    net = small(norm="instance", upsample="interpolate", stem_stride=stem_stride).eval()
    x = torch.randn(batch, 1, 32, 48, 1)
    with torch.no_grad():
        expected = net(x)
    to_channels_last_3d(net)
    layouts = []
    for module in net.modules():
        if isinstance(module, SectionConv3d):
            module.register_forward_pre_hook(
                lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))
            )
    with torch.no_grad():
        logits = net(x)
    assert len(layouts) > 10 and all(layouts[1:])  # the first one is the 1-channel image
    # float32 sums in another order through some 30 layers: agreement to 1e-3 of the logits' range
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("upsample,periodic", [("transposed", True), ("interpolate", False)])
def test_transposed_up_sampling_prints_a_grid_on_a_flat_image(upsample, periodic):
    """The dotted grid of the old default: on a flat image a kernel = stride = 2 transposed convolution gives each
    of its 2x2 sub-positions its own weights, so the logits repeat with a period of 2, 4 and 8 voxels; nearest
    up-sampling followed by a convolution gives a flat interior."""
    torch.manual_seed(0)
    net = HybridUNet2D3D(features=8, upsample=upsample, pyramid=False).eval()
    with torch.no_grad():
        logits = net(torch.full((1, 1, 128, 128, 1), 0.5))[0, :, 48:80, 48:80, 0]  # beyond the padding's reach
    spread = (logits - logits.mean(dim=(1, 2), keepdim=True)).abs().max() / logits.abs().max()
    assert (spread.item() > 1e-3) == periodic  # measured: 1.2e-2 transposed, 1.5e-5 interpolate


@pytest.mark.parametrize("pyramid", [True, False])
def test_stem_stride_2_halves_the_working_grid_and_returns_full_resolution_logits(pyramid):
    net = small(stem_stride=2, pyramid=pyramid, out_channels=3, norm="instance", upsample="interpolate")
    assert net.spatial_divisor == 16  # the stem's stride times the three pooling steps
    seen = []
    hook = net.net_2d.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    x = torch.randn(2, 1, 32, 48, 3)
    out = net(x)
    hook.remove()  # TorchScript cannot compile the lambda
    assert seen == [(2, 8, 16, 24, 3)]  # the encoder-decoder runs on the halved xy grid, z untouched
    assert out.shape == ((2, 2, 3, 32, 48, 3) if pyramid else (2, 3, 32, 48, 3))
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    groups = net.l2_parameter_groups()  # raises unless the stem and up-samplings are in exactly one group
    assert any(p is net.stem.conv.weight for p in groups[0]["params"])
    net.eval()
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))
    reason = r"divisible by 16 \(2\*\*3 for the \(2, 2, 1\) max-pool steps times the stem's stride 2\)"
    with pytest.raises(ValueError, match=reason):
        net(torch.randn(1, 1, 24, 32, 1))


def test_stem_stride_1_keeps_the_paper_network_and_its_checkpoints(default_net):
    assert not any(key.startswith(("stem.", "up_2d.", "up_3d.")) for key in default_net.state_dict())
    with pytest.raises(ValueError, match="stem_stride"):
        HybridUNet2D3D(stem_stride=4)


@pytest.mark.parametrize("pyramid", [True, False])
def test_stem_skip_refines_both_heads_from_full_resolution_image_features(pyramid):
    net = small(stem_stride=2, stem_skip=True, pyramid=pyramid, out_channels=3, norm="instance", upsample="interpolate")
    x = torch.randn(2, 1, 32, 48, 3)
    out = net(x)
    assert out.shape == ((2, 2, 3, 32, 48, 3) if pyramid else (2, 3, 32, 48, 3))
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # the skip reaches the loss through each head
    assert (net.refine_3d is not None) == pyramid
    net.l2_parameter_groups()  # raises unless every parameter is in exactly one group
    net.eval()
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))
    plain = small(stem_stride=2, out_channels=3, norm="instance", upsample="interpolate")
    assert not any(key.startswith(("skip.", "refine_")) for key in plain.state_dict())
