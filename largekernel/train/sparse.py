"""Dynamic sparse training (SLaK, Liu et al., ICLR 2023, Sec. 4.2; shift-wise, CVPR 2025): prune and regrow.

Semantics follow the official ``sparse_core.py`` of VITA-Group/SLaK (shared by lidc54/shift-wiseConv):

* Targets. Modules following the sparsity protocol (class attribute ``sparse_params`` and, per named
  parameter ``p``, a buffer ``p + "_mask"`` broadcasting to it, used as ``p * mask`` in forward) own their
  masks. With ``scope="all"`` (the official default: ``--only-L`` off) every other Linear / conv weight (the
  official: every 2-D/4-D parameter, the same set in SLaK) is masked too; the engine holds those masks.
  ``scope="protocol"`` is the official ``--only-L`` (SLaK: the ``LoRA1``/``LoRA2`` kernels; shift-wise: its
  grouped small kernels).
* Units. A mask entry is a unit: a single weight for full-shape masks, a whole small kernel for a
  (C, 1, 1, 1) mask on a (C, 1, k, k) weight. Scores are summed over the broadcast dims. A protocol module
  may define ``sparse_score(name) -> Tensor`` (mask-shaped) to override the magnitude; any module may
  define ``sparse_ties() -> list[list[str]]`` (parameter names relative to it) whose masks are one shared
  mask: scores add up over the tied parameters and one decision is written to all.
* Init. The overall density ``1 - sparsity`` over the targets' units. ``snip``: layer densities from one
  batch (SNIP, |w * grad| against a global threshold), masks drawn at random with those densities;
  ``erk``: Erdos-Renyi-Kernel densities; ``uniform``: the same density everywhere; ``resume``: masks
  from the non-zero weights. Layers left at density >= 0.99 stay dense and are not updated (as official).
* Schedule. ``step()`` after every optimizer step: weights (and SGD momentum) are multiplied by the masks;
  every ``update_every`` steps each layer prunes ``ceil(rate * active)`` active units of smallest magnitude
  and regrows as many at random among its inactive units (official 'random' growth, exact count here),
  with ``rate`` cosine-decayed from ``prune_rate`` to ``prune_rate_min`` over ``total_steps``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DynamicSparsity", "SparseGroup", "SparseTarget", "count_nonzero_params", "find_sparse_targets",
           "group_sparse_targets"]

_INITS = ("snip", "erk", "uniform", "resume")
_SCOPES = ("all", "protocol")
# scope='all': the official code masks every 2-D/4-D parameter; in SLaK those are exactly these layers' weights
# (restricting to them keeps e.g. GRN's (1, 1, 1, C) gamma of other families out).
_DENSE_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


class SparseTarget:
    """One masked parameter: ``name`` (as in ``model.named_parameters()``), its owning ``module`` and local
    ``param_name``. The mask is the module's buffer ``param_name + "_mask"`` for protocol modules (looked up on
    every use, so ``model.to(...)`` is safe), else a float mask held here (moved to the parameter's device)."""

    def __init__(self, name: str, module: nn.Module, param_name: str, owned_mask: torch.Tensor | None = None) -> None:
        self.name = name
        self.module = module
        self.param_name = param_name
        self._owned = owned_mask

    @property
    def protocol(self) -> bool:
        return self._owned is None

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def mask(self) -> torch.Tensor:
        if self._owned is None:
            return getattr(self.module, self.param_name + "_mask")
        if self._owned.device != self.param.device:
            self._owned = self._owned.to(self.param.device)
        return self._owned

    @property
    def units(self) -> int:
        return self.mask.numel()

    @property
    def per_unit(self) -> int:
        return self.param.numel() // self.mask.numel()

    def magnitude(self) -> torch.Tensor:
        """Mask-shaped unit scores: |w| summed over the broadcast dims (or the module's ``sparse_score``)."""
        fn = getattr(self.module, "sparse_score", None)
        if self.protocol and callable(fn):
            return fn(self.param_name).detach().float()
        return self.param.detach().abs().float().sum_to_size(self.mask.shape)


def _check_mask(name: str, param: torch.Tensor, mask: torch.Tensor) -> None:
    try:
        fits = mask.dim() == param.dim() and torch.broadcast_shapes(mask.shape, param.shape) == param.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, which does not broadcast to the "
                         f"parameter's {tuple(param.shape)}")


def find_sparse_targets(model: nn.Module, scope: str = "all") -> list[SparseTarget]:
    """The parameters dynamic sparsity acts on, in module order (see the module docstring)."""
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    targets: list[SparseTarget] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        declared = tuple(getattr(type(module), "sparse_params", ()))
        for pname in declared:
            full = f"{mod_name}.{pname}" if mod_name else pname
            param, mask = getattr(module, pname, None), getattr(module, pname + "_mask", None)
            if not isinstance(param, nn.Parameter) or not isinstance(mask, torch.Tensor):
                raise ValueError(f"{full}: a sparse module needs parameter {pname!r} and buffer {pname + '_mask'!r}")
            _check_mask(full, param, mask)
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            if pname in declared:
                targets.append(SparseTarget(full, module, pname))
            elif scope == "all" and pname == "weight" and isinstance(module, _DENSE_LAYERS) and param.requires_grad:
                targets.append(SparseTarget(full, module, pname, torch.ones_like(param, dtype=torch.float32)))
            else:
                continue
            seen.add(id(param))
    return targets


def count_nonzero_params(model: nn.Module) -> int:
    """Non-zero parameter elements, counting masked-out weights as zero (what the SLaK paper reports)."""
    total = 0
    masked = {id(t.param): t for t in find_sparse_targets(model, "protocol")}  # forward sees param * mask
    for p in model.parameters():
        t = masked.get(id(p))
        w = p.detach() * t.mask if t is not None else p.detach()
        total += int(torch.count_nonzero(w))
    return total


class SparseGroup:
    """Targets that share one mask (declared by a module's ``sparse_ties()``); a lone target is a group of one.

    The first member's mask is edited; :meth:`broadcast` copies it to the others. Scores add up over members.
    """

    def __init__(self, members: list[SparseTarget]) -> None:
        self.members = members

    @property
    def name(self) -> str:
        return self.members[0].name

    @property
    def param(self) -> nn.Parameter:
        return self.members[0].param

    @property
    def mask(self) -> torch.Tensor:
        return self.members[0].mask

    @property
    def units(self) -> int:
        return self.members[0].units

    def magnitude(self) -> torch.Tensor:
        score = self.members[0].magnitude()
        for m in self.members[1:]:
            score = score + m.magnitude().to(score.device)
        return score

    @torch.no_grad()
    def broadcast(self) -> None:
        for m in self.members[1:]:
            m.mask.copy_(self.mask)


def group_sparse_targets(model: nn.Module, targets: list[SparseTarget]) -> list[SparseGroup]:
    """Group targets whose masks a module ties: ``module.sparse_ties() -> list[list[str]]`` names, relative
    to that module, parameters that must share one mask (e.g. shift-wise's ``N_path`` paths, whose official
    mask is one per layer, copied to every path)."""
    by_name = {t.name: t for t in targets}
    group_of: dict[str, list[SparseTarget]] = {t.name: [t] for t in targets}
    for mod_name, module in model.named_modules():
        fn = getattr(module, "sparse_ties", None)
        if not callable(fn):
            continue
        for tie in fn():
            full = [f"{mod_name}.{n}" if mod_name else n for n in tie]
            members = [by_name[n] for n in full if n in by_name]
            if len(members) < 2:
                continue
            if len({tuple(m.mask.shape) for m in members}) > 1:
                raise ValueError(f"tied masks of {full} have different shapes")
            merged: list[SparseTarget] = []
            for m in members:
                merged += [x for x in group_of[m.name] if x not in merged]
            merged.sort(key=targets.index)
            for x in merged:
                group_of[x.name] = merged
    groups, seen = [], set()
    for t in targets:
        members = group_of[t.name]
        if id(members) not in seen:
            seen.add(id(members))
            groups.append(SparseGroup(members))
    return groups


def _erk_densities(targets: list[SparseTarget] | list[SparseGroup], density: float,
                   power: float = 1.0) -> list[float]:
    """Erdos-Renyi-Kernel layer densities (official ``init('ERK')``): dense layers where the scale exceeds 1."""
    dense: set[int] = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for i, t in enumerate(targets):
            n = t.units
            if i in dense:
                rhs -= n * (1 - density)
            else:
                rhs += n * density
                shape = t.param.shape
                raw[i] = (float(np.sum(shape)) / float(np.prod(shape))) ** power
                divisor += raw[i] * n
        if not raw:
            return [1.0] * len(targets)
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps <= 1:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(targets))]
        dense.update(i for i, r in raw.items() if r == max_prob)


class DynamicSparsity:
    """Prune/regrow engine. Build after the model (and optimizer), call :meth:`step` after each optimizer step.

    Args:
        model: the model (its protocol modules, plus 2-D/4-D weights when ``scope='all'``).
        sparsity: fraction of the targets' units that are zero (SLaK 0.4, shift-wise 0.3).
        init: 'snip' (needs ``snip_batch``), 'erk', 'uniform' or 'resume' (masks from the zero weights).
        prune_rate: initial fraction of each layer's active units replaced per update (SLaK-S/B 0.3, -T 0.5).
        growth: 'random' (the official setting; the only one supported).
        update_every: optimizer steps between prune/regrow updates (official ``-u``; 0 = fixed masks).
        total_steps: optimizer steps of the whole run, the cosine decay period (None: constant rate).
        prune_rate_min: floor of the cosine decay (official ``eta_min`` 0.005).
        scope: 'all' (official default) or 'protocol' (official ``--only-L``).
        optimizer: when given, SGD ``momentum_buffer`` entries of masked weights are zeroed (as official).
        snip_batch: ``(inputs, targets)`` for SNIP; ``loss_fn(outputs, targets)`` defaults to cross-entropy.
        seed: seed of the engine's own generator (random masks and regrowth; identical on every rank).
    """

    def __init__(self, model: nn.Module, sparsity: float = 0.4, init: str = "snip", prune_rate: float = 0.3,
                 growth: str = "random", update_every: int = 100, total_steps: int | None = None,
                 prune_rate_min: float = 0.005, scope: str = "all", optimizer: torch.optim.Optimizer | None = None,
                 snip_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 verbose: bool = False) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if not 0.0 <= prune_rate < 1.0:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
        if growth != "random":
            raise ValueError(f"growth must be 'random', got {growth!r}")
        if update_every < 0:
            raise ValueError(f"update_every must be >= 0, got {update_every}")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps must be positive or None, got {total_steps}")
        if init == "snip" and snip_batch is None:
            raise ValueError("init='snip' needs snip_batch=(inputs, targets)")
        self.model = model
        self.sparsity = sparsity
        self.density = 1.0 - sparsity
        self.init_mode = init
        self.prune_rate0 = prune_rate
        self.prune_rate_min = prune_rate_min
        self.update_every = update_every
        self.total_steps = total_steps
        self.scope = scope
        self.optimizer = optimizer
        self.verbose = verbose
        self.steps = 0
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[str, torch.Generator] = {}
        self.targets = find_sparse_targets(model, scope)
        if not self.targets:
            raise ValueError(f"the model has no parameters to sparsify with scope={scope!r}")
        self.groups = group_sparse_targets(model, self.targets)
        self.dense_names: set[str] = set()
        self.init_densities: dict[str, float] = {}  # layer densities chosen at init (snip / erk / uniform)
        self._initialize(snip_batch, loss_fn or F.cross_entropy)

    # ------------------------------------------------------------------ masks
    def _active(self) -> Iterator[SparseGroup]:
        return (g for g in self.groups if g.name not in self.dense_names)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        key = str(device)
        if key not in self._device_generators:
            self._device_generators[key] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._device_generators[key]

    def _random_mask(self, g: SparseGroup, density: float) -> None:
        n = g.units
        keep = min(n, max(0, round(density * n)))
        flat = torch.zeros(n)
        flat[torch.randperm(n, generator=self.generator)[:keep]] = 1.0
        g.mask.copy_(flat.view(g.mask.shape))
        g.broadcast()

    @torch.no_grad()
    def _initialize(self, snip_batch: tuple[torch.Tensor, torch.Tensor] | None,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        if self.init_mode == "resume":
            for g in self.groups:
                alive = torch.zeros(g.mask.shape, dtype=torch.bool, device=g.mask.device)
                for m in g.members:
                    alive |= m.magnitude().to(alive.device) != 0
                g.mask.copy_(alive.to(g.mask.dtype))
                g.broadcast()
        else:
            if self.init_mode == "uniform":
                densities = [self.density] * len(self.groups)
            elif self.init_mode == "erk":
                densities = _erk_densities(self.groups, self.density)
            else:
                densities = self._snip_densities(snip_batch, loss_fn)
            self.init_densities = {m.name: d for g, d in zip(self.groups, densities) for m in g.members}
            for g, d in zip(self.groups, densities):
                self._random_mask(g, d)
        for g in self.groups:  # official: layers left (nearly) dense are not sparsified at all
            if g.mask.float().mean().item() >= 0.99:
                g.mask.fill_(1.0)
                g.broadcast()
                self.dense_names.update(m.name for m in g.members)
        self._sync()
        self.apply_masks()

    def _snip_densities(self, batch: tuple[torch.Tensor, torch.Tensor],
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[float]:
        """SNIP (Lee et al., 2019) as the official code uses it: per-layer keep ratios from |w * dL/dw|."""
        import copy

        net = copy.deepcopy(self.model)
        net.zero_grad()
        clones = {t.name: t for t in find_sparse_targets(net, self.scope)}
        with torch.enable_grad():
            loss_fn(net(batch[0]), batch[1]).backward()
        scores = []
        for g in self.groups:
            score = 0
            for m in g.members:
                c = clones[m.name]
                grad = c.param.grad if c.param.grad is not None else torch.zeros_like(c.param)
                score = score + (c.param.detach() * grad).abs().float().sum_to_size(m.mask.shape).flatten()
            scores.append(score)
        del net
        all_scores = torch.cat(scores)
        keep = int(all_scores.numel() * self.density)
        if keep == 0:
            return [0.0] * len(scores)
        threshold = torch.topk(all_scores, keep, sorted=True).values[-1]
        return [(s > threshold).float().mean().item() for s in scores]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the masked weights (and SGD momentum) in place."""
        for t in self.targets:
            t.param.mul_(t.mask.to(t.param.dtype))
            if self.optimizer is not None:
                buf = self.optimizer.state.get(t.param, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(t.mask.to(buf.dtype))

    @torch.no_grad()
    def apply_masks_to(self, other: nn.Module) -> None:
        """Zero the masked weights of a copy of the model (e.g. the EMA model: call after its update), by
        parameter name. The official EMA also zeroes pruned entries (and restarts regrown ones from the
        model's value)."""
        params = dict(other.named_parameters())
        for t in self.targets:
            p = params.get(t.name)
            if p is None:
                raise ValueError(f"{type(other).__name__} has no parameter {t.name!r}")
            p.mul_(t.mask.to(device=p.device, dtype=p.dtype))

    def _sync(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in self.targets:
                dist.broadcast(t.mask, src=0)

    # ------------------------------------------------------------------ schedule
    def prune_rate(self, step: int | None = None) -> float:
        """The cosine-decayed prune rate at optimizer step ``step`` (default: the current one)."""
        step = self.steps if step is None else step
        if self.total_steps is None:
            return self.prune_rate0
        s = min(step, self.total_steps)
        lo = self.prune_rate_min
        return lo + (self.prune_rate0 - lo) * (1 + math.cos(math.pi * s / self.total_steps)) / 2

    def step(self) -> dict[str, float] | None:
        """Call after ``optimizer.step()``. Applies the masks; on update steps prunes and regrows and returns
        the statistics of :meth:`update`, else None."""
        self.apply_masks()
        self.steps += 1
        if self.update_every and self.steps % self.update_every == 0:
            return self.update()
        return None

    @torch.no_grad()
    def update(self, rate: float | None = None) -> dict[str, float]:
        """One prune/regrow round in every sparse layer. Returns ``{'prune_rate', 'pruned', 'regrown',
        'new_units', 'density'}`` (units, summed over layers; ``new_units`` = regrown units that were not
        active before the round)."""
        rate = self.prune_rate() if rate is None else rate
        pruned = regrown = new_units = 0
        for g in self._active():
            mask = g.mask.view(-1)
            before = mask > 0
            n_active = int(before.sum())
            n_remove = math.ceil(rate * n_active)
            if n_remove == 0:
                continue
            score = g.magnitude().view(-1).to(mask.device)
            score = torch.where(before, score, torch.full_like(score, math.inf))
            drop = torch.argsort(score, stable=True)[:n_remove]
            mask[drop] = 0.0
            # uniform random choice among the empty units (just-pruned ones included, as official)
            keys = torch.rand(mask.numel(), generator=self._generator(mask.device), device=mask.device)
            grow = torch.topk(torch.where(mask == 0, keys, torch.full_like(keys, -1.0)), n_remove).indices
            mask[grow] = 1.0
            g.broadcast()
            pruned += n_remove
            regrown += grow.numel()
            new_units += int((~before[grow]).sum())
        self._sync()
        self.apply_masks()
        stats = dict(prune_rate=rate, pruned=float(pruned), regrown=float(regrown), new_units=float(new_units),
                     density=self.current_density())
        if self.verbose:
            print(f"[sparse] step {self.steps}: prune rate {rate:.4f}, {pruned} units pruned / {regrown} regrown, "
                  f"density {stats['density']:.4f}")
        return stats

    # ------------------------------------------------------------------ reporting and checkpoints
    def current_density(self) -> float:
        """Active fraction of the targets' weights (dense-kept layers included)."""
        kept = sum(float(t.mask.float().sum()) * t.per_unit for t in self.targets)
        return kept / sum(t.param.numel() for t in self.targets)

    def layer_densities(self) -> dict[str, float]:
        return {t.name: float(t.mask.float().mean()) for t in self.targets}

    def nonzero_params(self) -> int:
        """Parameters of the model counted as the SLaK paper does: masked-out weights excluded."""
        targets = {id(t.param): t for t in self.targets}
        total = 0
        for p in self.model.parameters():
            t = targets.get(id(p))
            total += p.numel() if t is None else int(float(t.mask.float().sum()) * t.per_unit)
        return total

    def state_dict(self) -> dict:
        return dict(steps=self.steps, masks={t.name: t.mask.detach().clone() for t in self.targets},
                    dense_names=sorted(self.dense_names), generator=self.generator.get_state(),
                    device_generators={k: g.get_state() for k, g in self._device_generators.items()},
                    config=dict(sparsity=self.sparsity, prune_rate=self.prune_rate0, update_every=self.update_every,
                                total_steps=self.total_steps, prune_rate_min=self.prune_rate_min, scope=self.scope))

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        masks = state["masks"]
        names = {t.name for t in self.targets}
        if set(masks) != names:
            missing, extra = sorted(names - set(masks)), sorted(set(masks) - names)
            raise ValueError(f"sparsity state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for t in self.targets:
            t.mask.copy_(masks[t.name])
        self.steps = int(state["steps"])
        self.dense_names = set(state.get("dense_names", ()))
        if "generator" in state:
            self.generator.set_state(state["generator"])
        for key, gen_state in state.get("device_generators", {}).items():
            try:
                self._generator(torch.device(key)).set_state(gen_state)
            except (RuntimeError, AssertionError):  # device absent now: keep the fresh seeded generator
                pass
        self.apply_masks()
