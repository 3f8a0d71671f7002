import torch

from scripts.inference import CentreWindowInferer


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
