"""``largekernel.ops.layout`` outside Triton: what it returns where the Triton transpose does not run (the
interpreter tests in ``test_ops_depthwise_interp.py`` check the kernel itself, bit for bit and with autograd)."""
import torch

from largekernel.ops.layout import rowmajor, to_memory_format


def test_already_in_the_format_is_returned_as_is():
    x = torch.randn(2, 3, 4, 5)
    assert to_memory_format(x, torch.contiguous_format) is x
    cl = x.contiguous(memory_format=torch.channels_last)
    assert to_memory_format(cl, torch.channels_last) is cl
    assert rowmajor(x) is x
    cropped = x[..., 1:]   # unit stride along W, not contiguous: the kernels take it as it is
    assert rowmajor(cropped) is cropped


def test_cpu_copies_equal_pytorch_and_keep_autograd():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    rows = rowmajor(x)
    assert rows.is_contiguous() and torch.equal(rows, x)
    g = torch.randn(2, 3, 4, 5)
    (rows * g).sum().backward()
    assert torch.equal(x.grad, g)
    back = to_memory_format(rows.detach(), torch.channels_last)
    assert back.is_contiguous(memory_format=torch.channels_last) and torch.equal(back, x.detach())
    # other ranks and strides fall back to PyTorch's copy
    t = torch.randn(3, 4, 5)[:, :, ::2]
    assert torch.equal(to_memory_format(t, torch.contiguous_format), t)
