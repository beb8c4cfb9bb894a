"""Operators: functions, their autograd, and the one dispatch point for the fast kernels."""
from largekernel.ops.depthwise import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
