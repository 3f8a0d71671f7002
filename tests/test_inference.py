import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from conftest import BUNDLE
from scripts.ensembles import EnsembleNetwork
from scripts.inference import (
    CentreWindowInferer,
    FittedSlidingWindowInferer,
    FlipTTA,
    class_indices,
    fitted_batch_size,
    fitted_window,
)


def conv_network(seed: int) -> torch.nn.Module:
    """Random 3x3x3 convolution to two classes: not flip-equivariant."""
    torch.manual_seed(seed)
    return torch.nn.Conv3d(1, 2, 3, padding=1)


class _Pointwise(torch.nn.Module):
    """Flip-equivariant: logits are a function of each voxel alone."""

    def forward(self, x):
        return torch.cat([x, -2 * x], dim=1)


def test_flip_tta():
    x = torch.randn(2, 1, 16, 8, 3)
    network = conv_network(0)
    with torch.inference_mode():
        torch.testing.assert_close(torch.softmax(FlipTTA(network, ())(x), 1), torch.softmax(network(x), 1))
        torch.testing.assert_close(FlipTTA(_Pointwise(), (0, 1, 2))(x), torch.log_softmax(_Pointwise()(x), 1))
        flips = [[], [2], [4], [2, 4]]  # every combination of x and z
        expected = sum(torch.flip(torch.softmax(network(torch.flip(x, f)), 1), f) for f in flips) / 4
        torch.testing.assert_close(FlipTTA(network, (0, 2))(x), torch.log(expected))
        assert not torch.allclose(FlipTTA(network, (0, 2))(x), torch.log_softmax(network(x), 1))
    with pytest.raises(ValueError, match="tta_axes"):
        FlipTTA(network, (3,))


def test_flip_tta_composes_with_ensembles():
    x = torch.randn(1, 1, 16, 16, 3)
    a, b = conv_network(0), conv_network(1)
    with torch.inference_mode():
        tta_of_ensemble = FlipTTA(EnsembleNetwork([a, b]), (0, 1))(x)
        ensemble_of_tta = EnsembleNetwork([FlipTTA(a, (0, 1)), FlipTTA(b, (0, 1))])(x)
        flips = [[], [2], [3], [2, 3]]
        expected = sum(torch.flip(torch.softmax(n(torch.flip(x, f)), 1), f) for n in (a, b) for f in flips) / 8
    torch.testing.assert_close(tta_of_ensemble, torch.log(expected))
    torch.testing.assert_close(ensemble_of_tta, torch.log(expected))


def test_fitted_inferer_averages_flips_of_every_window():
    """``tta_axes`` flips each window, not the volume: the result is MONAI's sliding window over ``FlipTTA``."""
    image = torch.randn(1, 1, 40, 36, 1)
    network = conv_network(2)
    options = {"overlap": 0.25, "mode": "gaussian"}
    with torch.inference_mode():
        tta = FittedSlidingWindowInferer((24, 24, 3), tta_axes=[0, 1], **options)(image, network)
        expected = SlidingWindowInferer((24, 24, 1), **options)(image, FlipTTA(network, (0, 1)))
        plain = FittedSlidingWindowInferer((24, 24, 3), **options)(image, network)
    torch.testing.assert_close(tta, expected)
    assert not torch.allclose(torch.softmax(tta, 1), torch.softmax(plain, 1), atol=1e-3)
    with pytest.raises(ValueError, match="tta_axes"):
        FittedSlidingWindowInferer((24, 24, 3), tta_axes=[0, 0])


def test_inference_config_passes_tta_axes_to_its_inferer():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs/inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "tta_axes": [1, 0]})
    assert parser.get_parsed_content("inferer").tta_axes == (1, 0)


def test_centre_window_inferer_keeps_only_window_centres():
    """A predictor that marks its window's central third with 1 and the rest with 0: every voxel the central
    thirds tile must come out 1, so no window border contributed."""
    roi = (48, 48, 1)

    def predictor(window):
        out = torch.zeros_like(window)
        out[:, :, 16:32, 16:32] = 1.0
        return out

    image = torch.randn(1, 1, 112, 96, 2)
    out = CentreWindowInferer(roi)(image, predictor)
    assert out.shape == image.shape
    interior = out[:, :, 16:-16, 16:-16]
    torch.testing.assert_close(interior, torch.ones_like(interior), atol=1e-2, rtol=0)


def test_centre_window_inferer_covers_volume_borders_and_is_identity_for_identity():
    image = torch.randn(1, 1, 100, 90, 3)
    out = CentreWindowInferer((48, 48, 3))(image, lambda w: w * 2)
    torch.testing.assert_close(out, image * 2, atol=1e-4, rtol=1e-4)


def test_fitted_window_shrinks_to_a_single_section_instead_of_padding():
    """The network sees windows as deep as the volume (one section, not one among four padded ones); on a volume
    as deep as the window it is MONAI's sliding window."""
    depths = []

    def predictor(window):
        depths.append(window.shape[-1])
        return window * 3

    section = torch.randn(1, 1, 40, 40, 1)
    fitted = FittedSlidingWindowInferer((32, 32, 5), overlap=0.25, mode="gaussian")
    torch.testing.assert_close(fitted(section, predictor), section * 3)
    assert set(depths) == {1}
    depths.clear()
    SlidingWindowInferer((32, 32, 5), overlap=0.25, mode="gaussian")(section, predictor)
    assert set(depths) == {5}  # what the fitted one avoids

    stack = torch.randn(1, 1, 40, 40, 7)
    plain = SlidingWindowInferer((32, 32, 5), overlap=0.25, mode="gaussian")(stack, lambda w: w.cumsum(-1))
    torch.testing.assert_close(fitted(stack, lambda w: w.cumsum(-1)), plain)
    with_x = FittedSlidingWindowInferer((64, 32, 5), fit_axes=[0, 2])
    depths.clear()
    assert with_x(section, predictor).shape == section.shape and set(depths) == {1}


def test_fitted_window_keeps_the_network_divisor_in_x_and_y():
    assert fitted_window((800, 810, 1), (1024, 1024, 1), (2,), 16) == [800, 816, 1]
    assert fitted_window((800, 810, 3), (1024, 1024, 5), (2,), 0) == [1024, 1024, 3]  # divisor unknown: padded
    assert fitted_window((2000, 300, 9), (1024, 1024, 5), (2,), 16) == [1024, 304, 5]
    assert fitted_window((100, 300, 1), (1024, 1024, 1), (2,), 16, (256, 256)) == [256, 304, 1]  # not below
    assert fitted_window((100, 300, 1), (1024, 1024, 1), (2,), 0, (256, 256)) == [256, 512, 1]  # its multiples

    shapes = []

    def predictor(window):
        shapes.append(tuple(window.shape[2:]))
        return window * 3

    section = torch.randn(1, 1, 70, 90, 1)
    inferer = FittedSlidingWindowInferer((128, 128, 1), fit_divisor=16, overlap=0.25, mode="gaussian")
    torch.testing.assert_close(inferer(section, predictor), section * 3)
    assert shapes == [(80, 96, 1)]  # one window: the section padded to multiples of 16, not to 128 x 128


def test_batch_of_windows_is_capped_by_its_voxels():
    assert fitted_batch_size(4, (256, 256, 1), 262144) == 4
    assert fitted_batch_size(4, (512, 512, 1), 262144) == 1
    assert fitted_batch_size(4, (384, 256, 1), 262144) == 2
    assert fitted_batch_size(4, (1024, 1024, 1), 262144) == 1  # never below one window
    assert fitted_batch_size(4, (1024, 1024, 1), 0) == 4  # no cap

    batches = []

    def predictor(windows):
        batches.append(windows.shape[0])
        return windows * 3

    volume = torch.randn(1, 1, 150, 150, 1)
    capped = FittedSlidingWindowInferer(
        (64, 64, 1), fit_divisor=16, sw_batch_size=4, sw_batch_voxels=2 * 64 * 64, overlap=0.25, mode="gaussian"
    )
    torch.testing.assert_close(capped(volume, predictor), volume * 3)
    assert max(batches) == 2 and sum(batches) == 9  # 3 x 3 windows of 64, two a pass
    batches.clear()
    fitted = FittedSlidingWindowInferer(
        (256, 256, 1), fit_divisor=16, fit_min=(256, 256), sw_batch_size=4, sw_batch_voxels=2 * 64 * 64
    )
    fitted(torch.randn(1, 1, 40, 40, 3), predictor)  # fitted to (256, 256, 1) at least: one window a pass
    assert batches == [1, 1, 1]


def test_class_indices_is_argmax_with_its_first_maximum_on_ties():
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (5, 40, 30, 2)).float()  # few distinct values: many ties
    for dim in range(logits.ndim):
        assert torch.equal(class_indices(logits, dim), logits.argmax(dim))
    assert class_indices(torch.tensor([[1.0, 2.0], [1.0, 2.0]])).tolist() == [0, 0]
