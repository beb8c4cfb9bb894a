"""A training step captured in a CUDA graph and replayed (``largekernel train --cuda-graph``).

Eager PyTorch launches every kernel of a step from Python. A large-kernel ConvNet's training form launches many
(RepLKNet-31B: 203 BatchNorms and 120 convs per step), so on a slow host the CPU, not the GPU, sets the pace: on the
H100 the replayed RepLKNet-31B step ran 1.7x faster than the eager one (docs/performance.md, "Whole models, v7").
:class:`GraphedTrainStep` captures one whole update (forward, loss, backward, gradient clipping, optimizer step) once
and then replays it for every batch of the same shape, PyTorch's whole-network recipe:

* the first ``warmup`` steps run eagerly on a side stream (they are real updates, and they compile and tune the
  kernels), then one step is captured with static input buffers and replayed; later batches are copied into the
  buffers; a batch of another shape (a last partial batch) runs eagerly on the same parameters and gradients;
* the optimizer must be ``torch.optim.Adam`` / ``AdamW`` (made ``capturable``: its step counters live on the GPU);
  the learning rate of every parameter group is read through a GPU tensor, refreshed from ``group["lr"]`` before
  each replay, so the per-step scheduler keeps working unchanged (``group["lr"]`` stays a float);
* autocast's weight-cast cache is off inside the captured step (it would keep tensors from outside the graph's
  memory pool).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn

CAPTURABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


class GraphedTrainStep:
    """``step(x, y) -> loss`` (a 0-d tensor): one optimizer update of ``model`` on the batch ``(x, y)``.

    model: the module being trained (in train mode); criterion(logits, y) -> loss; optimizer: Adam / AdamW over the
    model's parameters; autocast: a function ``cache_enabled -> context manager`` (mixed precision, or a null
    context); clip_grad: max gradient norm or None; warmup: eager steps before the capture (>= 1).
    """

    def __init__(self, model: nn.Module, criterion: Callable, optimizer: torch.optim.Optimizer,
                 autocast: Callable[[bool], contextlib.AbstractContextManager], clip_grad: float | None = None,
                 warmup: int = 3) -> None:
        if not isinstance(optimizer, CAPTURABLE_OPTIMIZERS):
            raise ValueError(f"cuda_graph needs the optimizer 'adam' or 'adamw' (capturable), got "
                             f"{type(optimizer).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.autocast, self.clip_grad, self.warmup = autocast, clip_grad, warmup
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._lrs: list[torch.Tensor] = []
        self._x = self._y = self._loss = None

    def _make_capturable(self) -> None:
        """Before the first update (a resumed optimizer state may have been saved by a non-capturable run, and
        ``load_state_dict`` restores its groups' flags): capturable groups, step counters on the parameters' device."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                step = self.optimizer.state.get(p, {}).get("step")
                if torch.is_tensor(step) and step.device != p.device:
                    self.optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)

    def _update(self, x: torch.Tensor, y: torch.Tensor, cache_enabled: bool = True) -> torch.Tensor:
        with self.autocast(cache_enabled):
            loss = self.criterion(self.model(x), y)
        loss.backward()
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # in place: once captured, the graph owns the gradient tensors (a backward accumulates into them)
        self.optimizer.zero_grad(set_to_none=self.graph is None)
        return self._update(x, y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._x, self._y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)   # the backward captured allocates the graph's own gradients
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._lrs = [torch.tensor(float(lr), dtype=torch.float32, device=x.device) for lr in lrs]
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            group["lr"] = lr
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._loss = self._update(self._x, self._y, cache_enabled=False)
        finally:   # the scheduler, logging and checkpoints keep seeing floats
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
        self.graph = graph

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graph is None and self.eager_steps == 0:
            self._make_capturable()
        if self.graph is None and self.eager_steps < self.warmup:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                loss = self._eager(x, y)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.eager_steps += 1
            return loss
        if self.graph is None:
            self._capture(x, y)   # records the update without running it: the replay below runs it
        elif x.shape != self._x.shape or y.shape != self._y.shape or x.stride() != self._x.stride():
            return self._eager(x, y)
        else:
            self._x.copy_(x)
            self._y.copy_(y)
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            lr.fill_(float(group["lr"]))
        self.graph.replay()
        return self._loss
