"""Dynamic sparse training engine: densities, masking through optimizer steps, magnitude pruning, random
regrowth, the cosine schedule, state round trip, whole-kernel (group) mask units."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import largekernel  # noqa: F401  (registers the models)
from largekernel.train.sparse import DynamicSparsity, _erk_densities, count_nonzero_params, find_sparse_targets


class GroupMasked(nn.Module):
    """A protocol module with one mask entry per whole 3x3 kernel (shift-wise style): mask (C, 1, 1, 1)."""

    sparse_params = ("weight",)

    def __init__(self, channels: int = 40) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, 1, 3, 3))
        self.register_buffer("weight_mask", torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.weight_mask, padding=1, groups=self.weight.shape[0])


def _train_steps(model: nn.Module, engine: DynamicSparsity, opt: torch.optim.Optimizer, n: int,
                 shape: tuple[int, ...] = (2, 3, 32, 32)) -> list[dict]:
    stats = []
    for _ in range(n):
        out = model(torch.randn(shape))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        s = engine.step()
        if s is not None:
            stats.append(s)
    return stats


def _check_masked_zero(engine: DynamicSparsity) -> None:
    for t in engine.targets:
        dead = (t.mask == 0).expand_as(t.param)
        assert torch.count_nonzero(t.param.detach()[dead]) == 0, t.name


def test_targets_follow_official_scopes() -> None:
    model = timm.create_model("slak_test")
    protocol = [t.name for t in find_sparse_targets(model, "protocol")]
    assert protocol == [f"stages.{i}.0.large_kernel.LoRA{j}.conv.weight" for i in range(4) for j in (1, 2)]
    names = {t.name for t in find_sparse_targets(model, "all")}
    assert set(protocol) <= names
    assert {"stages.0.0.pwconv1.weight", "stages.0.0.large_kernel.small_conv.conv.weight", "head.weight",
            "downsample_layers.0.0.weight", "downsample_layers.2.1.weight"} <= names
    assert not any(n.endswith(("bias", "gamma")) or ".norm." in n or ".bn." in n for n in names)


def test_density_kept_and_masked_weights_stay_zero_through_training() -> None:
    model = timm.create_model("slak_test", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)  # moves zeroed weights back
    engine = DynamicSparsity(model, sparsity=0.4, init="uniform", prune_rate=0.3, update_every=2, total_steps=8,
                             optimizer=opt)
    counts = {t.name: int(t.mask.sum()) for t in engine.targets}
    assert abs(engine.current_density() - 0.6) < 1e-3
    stats = _train_steps(model, engine, opt, 6)
    assert len(stats) == 3
    for s in stats:
        assert s["pruned"] > 0 and s["regrown"] == s["pruned"] and s["new_units"] > 0
    assert {t.name: int(t.mask.sum()) for t in engine.targets} == counts  # exact per-layer density
    assert abs(engine.current_density() - 0.6) < 1e-3
    _check_masked_zero(engine)
    # the model sees the masks: a protocol weight's pruned entries get no gradient
    lora = model.stages[0][0].large_kernel.LoRA1.conv
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert torch.count_nonzero(lora.weight.grad[lora.weight_mask == 0]) == 0
    assert torch.count_nonzero(lora.weight.grad[lora.weight_mask == 1]) > 0
    # counted as the paper counts: masked-out weights are zeros
    assert count_nonzero_params(model) <= engine.nonzero_params()


def test_pruning_removes_smallest_magnitudes_and_regrowth_is_random() -> None:
    lin = nn.Linear(50, 40, bias=False)
    engine = DynamicSparsity(lin, sparsity=0.5, init="uniform", update_every=0)
    t = engine.targets[0]
    with torch.no_grad():
        lin.weight.copy_(torch.randperm(2000).float().view(40, 50) + 1.0)  # distinct magnitudes
        engine.apply_masks()
    before = t.mask.clone().bool()
    active_mags = lin.weight.detach()[before]
    n_remove = math.ceil(0.25 * int(before.sum()))
    smallest = lin.weight.detach() <= active_mags.sort().values[n_remove - 1]
    stats = engine.update(rate=0.25)
    after = t.mask.bool()
    assert stats["pruned"] == n_remove == stats["regrown"]
    assert int(after.sum()) == int(before.sum())
    lost = before & ~after
    assert lost.any() and bool((lost & ~smallest).sum() == 0)  # only the smallest active ones are gone
    assert bool((before & ~smallest & ~after).sum() == 0)  # every larger active weight survives
    grown = after & ~before
    assert int(grown.sum()) == stats["new_units"] > 0
    assert torch.count_nonzero(lin.weight.detach()[grown]) == 0  # regrown weights restart from zero


def test_group_mask_units() -> None:
    mod = GroupMasked(40)
    engine = DynamicSparsity(mod, sparsity=0.5, init="uniform", update_every=0, scope="protocol")
    t = engine.targets[0]
    assert t.units == 40 and t.per_unit == 9
    assert int(mod.weight_mask.sum()) == 20
    dead = mod.weight_mask.view(-1) == 0
    assert torch.count_nonzero(mod.weight.detach()[dead]) == 0  # whole kernels zeroed
    assert torch.count_nonzero(mod.weight.detach()[~dead]) == 20 * 9
    assert engine.current_density() == pytest.approx(0.5)
    assert engine.nonzero_params() == 20 * 9
    # kernel scores are summed |w| over the 3x3: give kernels distinct sums, single tiny entries
    with torch.no_grad():
        sums = torch.randperm(40).float() + 1.0
        mod.weight.copy_((sums / 9).view(40, 1, 1, 1).expand(40, 1, 3, 3))
        mod.weight[:, 0, 0, 0] = -mod.weight[:, 0, 0, 0]  # signs must not matter
        engine.apply_masks()
    alive = mod.weight_mask.view(-1).bool().clone()
    order = sums[alive].sort().values
    engine.update(rate=0.25)  # removes ceil(0.25 * 20) = 5 kernels
    now = mod.weight_mask.view(-1).bool()
    lost = alive & ~now
    assert bool((sums[lost] <= order[4]).all())
    assert bool((alive & (sums > order[4]) & ~now).sum() == 0)
    assert int(now.sum()) == 20
    out = mod(torch.randn(1, 40, 8, 8))
    assert torch.count_nonzero(out[0, ~now]) == 0  # a pruned kernel contributes nothing


def test_cosine_prune_rate() -> None:
    engine = DynamicSparsity(nn.Linear(8, 8), sparsity=0.5, init="uniform", prune_rate=0.3, total_steps=100)
    assert engine.prune_rate(0) == pytest.approx(0.3)
    assert engine.prune_rate(50) == pytest.approx((0.3 + 0.005) / 2)
    assert engine.prune_rate(100) == pytest.approx(0.005)
    assert engine.prune_rate(25) == pytest.approx(0.005 + 0.295 * (1 + math.cos(math.pi / 4)) / 2)


def test_state_dict_round_trip_reproduces_future_updates() -> None:
    def build(seed: int) -> tuple[nn.Module, DynamicSparsity]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5))
        return model, DynamicSparsity(model, sparsity=0.4, init="uniform", update_every=1, seed=seed)

    model_a, a = build(1)
    a.update(rate=0.3)
    state = a.state_dict()
    model_b, b = build(2)
    assert any(not torch.equal(x.mask, y.mask) for x, y in zip(a.targets, b.targets))
    model_b.load_state_dict(model_a.state_dict())
    b.load_state_dict(state)
    assert b.steps == a.steps
    for x, y in zip(a.targets, b.targets):
        assert torch.equal(x.mask, y.mask)
    a.update(rate=0.3)
    b.update(rate=0.3)
    for x, y in zip(a.targets, b.targets):
        assert torch.equal(x.mask, y.mask)
    with pytest.raises(ValueError, match="does not fit"):
        DynamicSparsity(nn.Linear(4, 4), sparsity=0.5, init="uniform").load_state_dict(state)


def test_snip_and_erk_budgets() -> None:
    model = timm.create_model("slak_test", num_classes=4)
    batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    engine = DynamicSparsity(model, sparsity=0.4, init="snip", snip_batch=batch, update_every=0)
    densities = [engine.init_densities[t.name] for t in engine.targets]
    units = [t.units for t in engine.targets]
    kept = sum(d * n for d, n in zip(densities, units))
    assert abs(kept - 0.6 * sum(units)) <= len(units) + 1  # a global threshold keeps 60% of the units
    assert len({round(d, 3) for d in densities}) > 3  # layer-wise, not uniform
    _check_masked_zero(engine)
    assert engine.current_density() >= 0.6 - 1e-3  # >= because layers left dense are kept dense

    erk = _erk_densities(engine.targets, 0.6)
    assert all(0 < d <= 1 for d in erk)
    assert sum(d * n for d, n in zip(erk, units)) == pytest.approx(0.6 * sum(units), rel=1e-6)


def test_resume_init_reads_zeros() -> None:
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight[:, :4] = 0
    engine = DynamicSparsity(lin, sparsity=0.4, init="resume")
    assert int(engine.targets[0].mask.sum()) == 60


def test_bad_arguments() -> None:
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="sparsity"):
        DynamicSparsity(lin, sparsity=1.0, init="uniform")
    with pytest.raises(ValueError, match="init"):
        DynamicSparsity(lin, init="magic")
    with pytest.raises(ValueError, match="snip_batch"):
        DynamicSparsity(lin, init="snip")
    with pytest.raises(ValueError, match="growth"):
        DynamicSparsity(lin, init="uniform", growth="gradient")
    with pytest.raises(ValueError, match="scope"):
        DynamicSparsity(lin, init="uniform", scope="some")
    with pytest.raises(ValueError, match="no parameters"):
        DynamicSparsity(lin, init="uniform", scope="protocol")
    bad = GroupMasked(4)
    bad.weight_mask = torch.ones(3, 1, 1, 1)
    with pytest.raises(ValueError, match="does not broadcast"):
        DynamicSparsity(bad, init="uniform", scope="protocol")


def test_engine_follows_the_model_across_to() -> None:
    model = timm.create_model("slak_test", num_classes=3)
    engine = DynamicSparsity(model, sparsity=0.4, init="uniform", update_every=1)
    model.double()  # replaces every buffer tensor (the protocol masks included)
    lora = model.stages[1][0].large_kernel.LoRA2.conv
    target = next(t for t in engine.targets if t.name == "stages.1.0.large_kernel.LoRA2.conv.weight")
    assert target.mask is lora.weight_mask
    with torch.no_grad():
        model.stages[0][0].pwconv1.weight.add_(1.0)  # revive masked entries; the engine must zero them again
    engine.step()
    _check_masked_zero(engine)
    assert abs(engine.current_density() - 0.6) < 1e-3


class TwoPaths(nn.Module):
    """Two masked paths whose masks are tied (shift-wise's N_path convs share one mask per small kernel)."""

    def __init__(self, channels: int = 30) -> None:
        super().__init__()
        self.a = GroupMasked(channels)
        self.b = GroupMasked(channels)

    def sparse_ties(self) -> list[list[str]]:
        return [["a.weight", "b.weight"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_tied_masks_share_decisions_on_summed_scores() -> None:
    mod = TwoPaths(30)
    engine = DynamicSparsity(mod, sparsity=0.5, init="uniform", update_every=0, scope="protocol")
    assert len(engine.groups) == 1 and len(engine.targets) == 2
    assert torch.equal(mod.a.weight_mask, mod.b.weight_mask) and int(mod.a.weight_mask.sum()) == 15
    with torch.no_grad():
        sa, sb = torch.randperm(30).float() + 1.0, torch.randperm(30).float() + 1.0
        mod.a.weight.copy_((sa / 9).view(30, 1, 1, 1).expand(30, 1, 3, 3))
        mod.b.weight.copy_((sb / 9).view(30, 1, 1, 1).expand(30, 1, 3, 3))
        engine.apply_masks()
    total = sa + sb
    alive = mod.a.weight_mask.view(-1).bool().clone()
    cut = total[alive].sort().values[3]  # ceil(0.25 * 15) = 4 kernels go
    engine.update(rate=0.25)
    now = mod.a.weight_mask.view(-1).bool()
    assert torch.equal(mod.a.weight_mask, mod.b.weight_mask)
    assert bool((total[alive & ~now] <= cut).all()) and bool((alive & (total > cut) & ~now).sum() == 0)
    assert int(now.sum()) == 15


def test_apply_masks_to_a_copy() -> None:
    import copy

    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 3))
    engine = DynamicSparsity(model, sparsity=0.5, init="uniform")
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
    engine.apply_masks_to(ema)
    assert int(torch.count_nonzero(ema[0].weight)) == 200 and int(torch.count_nonzero(ema[0].bias)) == 20
    assert torch.equal(ema[1].weight != 0, engine.targets[1].mask.bool())
