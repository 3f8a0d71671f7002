import torch
from monai.inferers import SlidingWindowInferer

from scripts.inference import CentreWindowInferer, FittedSlidingWindowInferer, class_indices


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


def test_class_indices_is_argmax_with_its_first_maximum_on_ties():
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (5, 40, 30, 2)).float()  # few distinct values: many ties
    for dim in range(logits.ndim):
        assert torch.equal(class_indices(logits, dim), logits.argmax(dim))
    assert class_indices(torch.tensor([[1.0, 2.0], [1.0, 2.0]])).tolist() == [0, 0]
