"""The "2D-3D+3x3x3" network of Guay et al. 2020 for dense semantic segmentation of 3D EM.

Guay, Emam, Anderson, Aronova, Leapman, "Dense cellular segmentation using 2D-3D neural network ensembles for
electron microscopy" (2020). A 2D U-Net-style encoder-decoder (1x3x3 convolutions, 1x2x2 pooling) with extra 3x3x3
convolutions at the start of the two finest encoder and decoder blocks, a 2D class predictor, and a two-level
3D convolutional spatial pyramid fed with the decoder features and the 2D predictions, then a 3D predictor.

Axis convention: MONAI channel-first ``(B, C, X, Y, Z)`` with ``Z`` = the section axis LAST. The paper's 1x3x3
convolution is therefore a ``(3, 3, 1)`` kernel here, its 1x2x2 pooling ``(2, 2, 1)``, and its (5, 300, 300)
window ``(300, 300, 5)``. ``Z`` is never pooled, so any number of sections works.

Widths, read from the authors' TensorFlow code (github.com/leapmanlab/examples, not copied):

* ``EncoderGene`` / ``DecoderGene._rescale_children``: a block at spatial scale ``s`` has ``features * 2**s``
  kernels (64, 128, 256, 512); ``DecoderGene.setup_children`` gives the decoder ONE MORE block than the encoder
  (the coarsest decoder block is the bottleneck). ``num_scales`` is the number of encoder blocks (the authors'
  ``n_blocks``) = the number of 1x2x2 max-pool steps. The released notebook's value could not be read (the
  stored notebook is mostly images), so it is inferred: the paper's 10.3 M parameters (and 9.9 M / 7.9 M for the
  ablations, Table 1) and its window (300 -> 296 = 37 * 8 in xy, i.e. divisible by 2**3) are only reproduced with
  ``num_scales = 3`` pooling steps (4 resolutions, widths 64..512); with 2 pooling steps the net has 4.4 M.
* ``Mixed3DEncoderDecoderGene.setup_edges``: every block with spatial scale < 2 (the first two encoder blocks and
  the last two decoder blocks) gets an EXTRA convolution inserted before its ``n_comps`` (= ``convs_per_block``)
  1x3x3 convolutions: a 3x3x3 convolution with ``n_kernels // 2`` kernels. The "no 3x3x3 convs" ablation keeps
  that layer as a 1x3x3 convolution of the same width (paper, "Validation and Performance Metrics").
* ``ScaleEdge.build``: up-sampling is a transposed convolution with kernel = stride = 1x2x2 and bias, without
  activation, whose width is that of the layer it feeds: ``n_kernels // 2`` in front of an extra 3x3x3
  convolution, ``n_kernels`` otherwise. The decoder block's first layer sees ``concat(up-sampled, encoder skip)``.
* ``hybrid_gene_graph`` / ``SpatialPyramidGene``: pyramid input = ``concat(2D predictions, decoder features)``;
  level ``i`` is max-pooled by ``2**i`` in xy, runs ``pyramid_convs[i]`` 3x3x3 convolutions with
  ``64 * 2**i`` kernels (the pyramid's own default ``n_kernels`` = 64, doubled per level), then a 1x1x1
  convolution (+ ReLU) back to the level-0 width and a transposed-convolution up-sampling; all levels are summed
  (``combine_mode='add'``, residual). ``pyramid_convs = (3, 5)``: the released ``comps_list``
  (3 and 5 convolutions).
* ``PredictorGene``: 1x1x1 convolutions with bias for the 2D and 3D class predictions.

Choices where the released code is not followed literally (documented here on purpose):

* the predictors output linear logits (the released predictor config also applies its ReLU to the logits;
  unconstrained logits are what softmax cross-entropy and MONAI post-processing expect);
* ``SpatialPyramidGene.setup_edges`` sets ``pool_z=True`` on level 1; the paper and the down-sampling edge use
  1x2x2 pooling, which is what is implemented (z is never pooled).

Parameter count with the defaults: 10,267,022 (paper: about 10.3 M); no 3x3x3 convs: 9,916,238 (9.9 M);
no 3D pyramid: 7,882,311 (7.9 M).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn

from scripts.layers import SectionConv3d, SpatialPyramid3D, StridedMaxPool3d, conv_block, upsampling

__all__ = ["HybridUNet2D3D"]

#: blocks whose spatial scale is below this get the extra (3x3x3) block-initial convolution (authors' rule).
_EXTRA_CONV_MAX_SCALE = 2
_KERNEL_2D = (3, 3, 1)  # the paper's 1x3x3 (z last)
_KERNEL_3D = (3, 3, 3)
_POOL_2D = (2, 2, 1)  # the paper's 1x2x2 (z last)


def _encoder_decoder_block(
    in_channels: int,
    out_channels: int,
    num_convs: int,
    extra_kernel: Optional[Sequence[int]],
    norm: Optional[str] = None,
) -> nn.Sequential:
    """``[extra conv (out/2)] + num_convs x (3,3,1) conv (out)``: every layer is a distinct module."""
    layers: list[nn.Module] = []
    channels = in_channels
    if extra_kernel is not None:
        layers.append(conv_block(channels, out_channels // 2, extra_kernel, norm))
        channels = out_channels // 2
    for _ in range(num_convs):
        layers.append(conv_block(channels, out_channels, _KERNEL_2D, norm))
        channels = out_channels
    return nn.Sequential(*layers)


class _UpStage(nn.Module):
    """Decoder stage: 1x2x2 up-sampling, concatenation with the encoder skip, conv block."""

    def __init__(self, in_channels: int, up_channels: int, block: nn.Sequential, upsample: str) -> None:
        super().__init__()
        self.up = upsampling(in_channels, up_channels, _POOL_2D, upsample)
        self.block = block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class _EncoderDecoder2D(nn.Module):
    """2D U-Net-style encoder-decoder on 3D windows ((3,3,1) convs, (2,2,1) pooling) with extra 3x3x3 convs."""

    def __init__(
        self,
        in_channels: int,
        features: int,
        num_scales: int,
        convs_per_block: int,
        conv3d_blocks: bool,
        norm: Optional[str] = None,
        upsample: str = "transposed",
    ) -> None:
        super().__init__()
        extra_kernel = _KERNEL_3D if conv3d_blocks else _KERNEL_2D

        def width(scale: int) -> int:
            return features * 2**scale

        def extra(scale: int) -> Optional[Sequence[int]]:
            return extra_kernel if scale < _EXTRA_CONV_MAX_SCALE else None

        self.pool = StridedMaxPool3d(_POOL_2D)  # stateless: one instance is enough
        encoder = []
        channels = in_channels
        for scale in range(num_scales):
            encoder.append(_encoder_decoder_block(channels, width(scale), convs_per_block, extra(scale), norm))
            channels = width(scale)
        self.encoder = nn.ModuleList(encoder)
        self.bottleneck = _encoder_decoder_block(channels, width(num_scales), convs_per_block, extra(num_scales), norm)
        channels = width(num_scales)
        decoder = []
        for scale in reversed(range(num_scales)):
            # the up-sampling width is that of the layer it feeds (authors' ScaleEdge: the target's n_kernels)
            up_channels = width(scale) // 2 if extra(scale) is not None else width(scale)
            block = _encoder_decoder_block(
                up_channels + width(scale), width(scale), convs_per_block, extra(scale), norm
            )
            decoder.append(_UpStage(channels, up_channels, block, upsample))
            channels = width(scale)
        self.decoder = nn.ModuleList(decoder)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = self.bottleneck(self.pool(x))
        n = len(skips)
        for i, stage in enumerate(self.decoder):
            x = stage(x, skips[n - 1 - i])
        return x


def _logit_refinement(classes: int, skip_channels: int, norm: Optional[str]) -> nn.Sequential:
    """(3, 3, 1) convolution of up-sampled logits and full-resolution image features, then 1x1x1 back to logits."""
    return nn.Sequential(
        conv_block(classes + skip_channels, skip_channels, _KERNEL_2D, norm),
        SectionConv3d(skip_channels, classes, kernel_size=1, bias=True),
    )


class HybridUNet2D3D(nn.Module):
    """2D-3D+3x3x3 network (Guay et al. 2020): 2D encoder-decoder + 2D predictor + 3D spatial pyramid + 3D predictor.

    Input ``(B, in_channels, X, Y, Z)`` (z = sections, last); X and Y must be divisible by ``spatial_divisor``
    (8 with the defaults), Z is free. Output: the 3D logits ``(B, out_channels, X, Y, Z)``; in training mode with
    ``deep_supervision`` and ``pyramid``, ``torch.stack([logits_3d, logits_2d], dim=1)`` of shape
    ``(B, 2, out_channels, X, Y, Z)`` (MONAI DynUNet convention; use ``[:, 0]`` for 3D, ``[:, 1]`` for 2D).

    Args:
        in_channels: image channels.
        out_channels: number of classes (7 for the platelet data).
        features: kernels of the finest encoder-decoder block; block at scale ``s`` has ``features * 2**s``.
        num_scales: encoder blocks = 1x2x2 max-pool steps (the authors' ``n_blocks``); the decoder has
            ``num_scales + 1`` blocks, the coarsest being the bottleneck. 3 reproduces the paper (10.3 M).
        convs_per_block: (3,3,1) convolutions per block (the authors' ``n_comps``).
        conv3d_blocks: True = the "+3x3x3" extra 3x3x3 conv (half the block's width) at the start of the first two
            encoder and last two decoder blocks; False = ablation "no 3x3x3 convs" (same layers as (3,3,1) convs).
        pyramid: True = 3D spatial pyramid + 3D predictor; False = ablation "no 3D pyramid" (2D logits are output).
        pyramid_convs: 3x3x3 convolutions per pyramid level (released configuration ``(3, 5)``).
        pyramid_features: width of each pyramid level; default ``features * 2**level`` = (64, 128) as in the
            authors' code. Level 0's width is the pyramid output width (fed to the 3D predictor).
        deep_supervision: return the 2D logits too in training mode (the paper's multi-loss, weight 0.33 on 2D).
        norm: normalisation after every convolution: None (the paper), ``"instance"``, ``"batch"`` or ``"group"``.
        upsample: ``"transposed"`` (the paper's 1x2x2 transposed convolutions) or ``"interpolate"`` (nearest
            up-sampling then a (3, 3, 1) convolution, free of the transposed convolution's period-2 grid).
        stem_stride: 1 (the paper) or 2: a (3, 3, 1) convolution of stride (2, 2, 1) with ``features`` kernels
            feeds the network, which then runs on a grid halved in x and y, and each head's logits are up-sampled
            back (``upsample``). The plain MONAI UNet's first layer is strided the same way: it quarters the work,
            most of which the full-resolution blocks do, and doubles each block's field of view.
        stem_skip: with ``stem_stride`` 2, a U-Net-style skip over the stem: a (3, 3, 1) convolution of the image
            (``features // 2`` kernels, full resolution) and, per head, a (3, 3, 1) convolution of the up-sampled
            logits and those features and a 1x1x1 one back to the classes, added to the up-sampled logits, so that
            boundaries are placed on the input's grid. About 1,200 multiply-adds per voxel and head.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 7,
        features: int = 64,
        num_scales: int = 3,
        convs_per_block: int = 2,
        conv3d_blocks: bool = True,
        pyramid: bool = True,
        pyramid_convs: Sequence[int] = (3, 5),
        pyramid_features: Optional[Sequence[int]] = None,
        deep_supervision: bool = True,
        norm: Optional[str] = None,
        upsample: str = "transposed",
        stem_stride: int = 1,
        stem_skip: bool = False,
    ) -> None:
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if features < 2:
            raise ValueError(f"features must be >= 2 (the extra 3x3x3 conv has features // 2 kernels), got {features}")
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        if convs_per_block < 1:
            raise ValueError(f"convs_per_block must be >= 1, got {convs_per_block}")
        pyramid_convs = tuple(int(n) for n in pyramid_convs)
        if pyramid and (len(pyramid_convs) < 1 or min(pyramid_convs) < 1):
            raise ValueError(f"pyramid_convs needs >= 1 level with >= 1 conv each, got {pyramid_convs}")
        if pyramid_features is None:
            pyramid_features = tuple(features * 2**i for i in range(len(pyramid_convs)))
        pyramid_features = tuple(int(f) for f in pyramid_features)
        if pyramid and len(pyramid_features) != len(pyramid_convs):
            raise ValueError(
                f"pyramid_features {pyramid_features} and pyramid_convs {pyramid_convs} must have the same length"
            )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.deep_supervision = bool(deep_supervision)
        self.pyramid = bool(pyramid)
        pool_steps = max(num_scales, len(pyramid_convs) - 1 if pyramid else 0)
        self.spatial_divisor: int = 2**pool_steps * stem_stride
        self.pool_steps: int = pool_steps
        self._stem_reason: str = f" times the stem's stride {stem_stride}" if stem_stride > 1 else ""

        # stride 1: Identity modules without parameters, so the paper network's checkpoints are unchanged
        stem_factor = (stem_stride, stem_stride, 1)
        self.stem: nn.Module = nn.Identity()
        self.up_2d: nn.Module = nn.Identity()
        self.up_3d: nn.Module = nn.Identity()
        if stem_stride > 1:
            self.stem = conv_block(in_channels, features, _KERNEL_2D, norm, stride=stem_factor)
            self.up_2d = upsampling(out_channels, out_channels, stem_factor, upsample)
        self.net_2d = _EncoderDecoder2D(
            features if stem_stride > 1 else in_channels,
            features,
            num_scales,
            convs_per_block,
            conv3d_blocks,
            norm,
            upsample,
        )
        self.predictor_2d = SectionConv3d(self.net_2d.out_channels, out_channels, kernel_size=1, bias=True)
        # plain None attributes when pyramid=False (TorchScript folds the `is None` branches away)
        self.net_3d = None
        self.predictor_3d = None
        if self.pyramid:
            self.net_3d = SpatialPyramid3D(
                out_channels + self.net_2d.out_channels, pyramid_features, pyramid_convs, norm, upsample
            )
            self.predictor_3d = SectionConv3d(self.net_3d.out_channels, out_channels, kernel_size=1, bias=True)
            if stem_stride > 1:
                self.up_3d = upsampling(out_channels, out_channels, stem_factor, upsample)
        # plain None attributes without the skip, as net_3d: the stem-only networks' checkpoints are unchanged
        self.skip = None
        self.refine_2d = None
        self.refine_3d = None
        if stem_stride > 1 and stem_skip:
            skip_channels = max(features // 2, 1)
            self.skip = conv_block(in_channels, skip_channels, _KERNEL_2D, norm)
            self.refine_2d = _logit_refinement(out_channels, skip_channels, norm)
            if self.pyramid:
                self.refine_3d = _logit_refinement(out_channels, skip_channels, norm)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform kernels and zero biases (TF ``xavier_initializer`` and the default bias initialiser)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"HybridUNet2D3D expects a 5D (B, C, X, Y, Z) tensor, got {x.dim()} dimensions")
        if not torch.jit.is_tracing():  # a traced graph is shape-specialised; keep the trace warning-free
            d = self.spatial_divisor
            sx, sy, sz = x.shape[2], x.shape[3], x.shape[4]
            if sx % d != 0 or sy % d != 0:
                raise ValueError(
                    f"HybridUNet2D3D: input spatial shape (X, Y, Z) = ({sx}, {sy}, {sz}) is invalid: X and Y must be "
                    f"divisible by {d} (2**{self.pool_steps} for the (2, 2, 1) max-pool steps{self._stem_reason}); "
                    f"crop or pad X and Y to a multiple of {d}, e.g. ({sx // d * d}, {sy // d * d}, {sz}). "
                    "Z (sections, last) is free."
                )
        skip_conv = self.skip
        skip = skip_conv(x) if skip_conv is not None else None
        features = self.net_2d(self.stem(x))
        logits_2d = self.predictor_2d(features)
        net_3d = self.net_3d
        predictor_3d = self.predictor_3d
        if net_3d is None or predictor_3d is None:
            return self._on_input_grid_2d(logits_2d, skip)
        logits_3d = self.up_3d(predictor_3d(net_3d(torch.cat([logits_2d, features], dim=1))))
        refine_3d = self.refine_3d
        if refine_3d is not None and skip is not None:
            logits_3d = logits_3d + refine_3d(torch.cat([logits_3d, skip], dim=1))
        if self.training and self.deep_supervision:
            return torch.stack([logits_3d, self._on_input_grid_2d(logits_2d, skip)], dim=1)
        return logits_3d

    def _on_input_grid_2d(self, logits_2d: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        """The 2D head's logits up-sampled from the stem's grid (identity without a stem), refined by the skip."""
        full = self.up_2d(logits_2d)
        refine_2d = self.refine_2d
        if refine_2d is not None and skip is not None:
            full = full + refine_2d(torch.cat([full, skip], dim=1))
        return full

    def l2_parameter_groups(
        self, lambda_2d: float = 10**-4.7, lambda_3d: float = 1e-5, lambda_pred: float = 1e-9
    ) -> list[dict]:
        """Parameter groups for ``torch.optim.Adam`` implementing the paper's L2 terms through weight decay.

        The paper's loss adds ``λ2D Σ‖θ‖²`` (encoder-decoder), ``λ3D Σ‖θ‖²`` (pyramid) and ``λP Σ‖θ‖²`` (the two
        1x1x1 predictors), kernels and biases alike. The gradient of ``λ‖θ‖²`` is ``2λθ``, so each group gets
        ``weight_decay = 2λ`` (coupled decay, i.e. Adam, not AdamW). Note: the released TF code used
        ``tf.contrib.layers.l2_regularizer`` = ``λ‖θ‖²/2``; pass ``λ/2`` to mirror it instead of the paper. With
        ``stem_stride`` 2, the stem and the 2D logits' up-sampling count as 2D layers, the 3D logits' as pyramid ones.

        Args:
            lambda_2d: λ of the 2D encoder-decoder (paper 10**-4.7).
            lambda_3d: λ of the 3D spatial pyramid (paper 1e-5).
            lambda_pred: λ of the 2D and 3D predictors (paper 1e-9).

        Returns:
            Non-empty groups ``{"params", "weight_decay", "name", "l2_lambda"}``; every parameter is in exactly one.
        """
        predictors = [self.predictor_2d] + ([self.predictor_3d] if self.predictor_3d is not None else [])
        spec = [
            (
                "net_2d",
                [m for m in (self.stem, self.skip, self.net_2d, self.up_2d, self.refine_2d) if m is not None],
                lambda_2d,
            ),
            ("net_3d", [m for m in (self.net_3d, self.up_3d, self.refine_3d) if m is not None], lambda_3d),
            ("predictors", predictors, lambda_pred),
        ]
        groups = []
        for name, modules, lam in spec:
            params = [p for m in modules for p in m.parameters()]
            if params:
                groups.append({"params": params, "weight_decay": 2.0 * lam, "name": name, "l2_lambda": lam})
        grouped = [id(p) for g in groups for p in g["params"]]
        if len(grouped) != len(set(grouped)) or set(grouped) != {id(p) for p in self.parameters()}:
            raise RuntimeError("l2_parameter_groups must cover every parameter exactly once")
        return groups
