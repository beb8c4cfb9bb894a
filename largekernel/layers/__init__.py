"""Reusable blocks; each re-parameterizable block owns its ``reparameterize()``."""
from largekernel.layers.conv import (
    ConvNorm,
    CrossDepthwiseConv2d,
    DepthwiseConv2d,
    PartialDepthwiseConv2d,
    PointwiseConv2d,
    conv_bn,
    conv_bn_relu,
    create_conv2d,
    fuse_bn,
    pad_kernel_to,
)
from largekernel.layers.large_kernel import ReparamLargeKernelConv, check_kernel_pair
from largekernel.layers.reparam import reparameterize

__all__ = [
    "ConvNorm", "CrossDepthwiseConv2d", "DepthwiseConv2d", "PartialDepthwiseConv2d", "PointwiseConv2d", "conv_bn",
    "conv_bn_relu", "create_conv2d", "fuse_bn", "pad_kernel_to",
    "ReparamLargeKernelConv", "check_kernel_pair", "reparameterize",
]
