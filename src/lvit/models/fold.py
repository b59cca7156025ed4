"""Inference-only model transforms."""

from __future__ import annotations


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    Works on modules that hold ``conv`` and ``norm`` children and apply them as ``norm(conv(x))`` (LViT's
    ConvBNReLU, Reconstruct and CTBN): the BatchNorm becomes ``nn.Identity``. The folded network computes the
    same function in eval mode (up to float rounding) with one pass over each activation less. Returns the
    number of folded pairs. Inference only: the folded model cannot be trained as the original.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (it bakes in the running statistics)")
    folded = 0
    for module in model.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "norm", None)
        if isinstance(conv, (nn.Conv1d, nn.Conv2d)) and isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.conv = fuse_conv_bn_eval(conv, norm)
            module.norm = nn.Identity()
            folded += 1
    return folded
