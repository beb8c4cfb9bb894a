"""Operators: functions, their autograd, and the one dispatch point for the fast kernels."""
from largekernel.ops.depthwise import clear_plane_operators, cross_depthwise_conv2d, depthwise_conv2d, depthwise_path
from largekernel.ops.dispatch import get_backend, set_backend, use_backend

__all__ = ["clear_plane_operators", "cross_depthwise_conv2d", "depthwise_conv2d", "depthwise_path", "get_backend",
           "set_backend", "use_backend"]
