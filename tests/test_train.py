"""Training loop: exact resume after a SIGKILL, NaN stop keeping the last good checkpoint, fine-tuning with a
new head, checkpoint safety, DDP (gloo, 2 CPU processes) equals one process with the same global batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from largekernel.train import TrainConfig, TrainingDiverged, fit, load_state, prepare, save_weights, train
from largekernel.train.checkpoint import atomic_write, load_weights, model_from_checkpoint

TINY = dict(model="replknet_test", data="pathfinder",
            data_kwargs={"size": 32, "length": 20, "distractors": 1, "scale": 1},
            train_samples=64, val_samples=32, batch_size=16, epochs=3, steps_per_epoch=3, threads=1, device="cpu",
            progress=False, lr=1e-3)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LARGEKERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "largekernel.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _args(out: Path, name: str) -> list[str]:
    return ["train", "--model", "replknet_test", "--data-kwargs", "size=32", "length=20", "distractors=1",
            "scale=1",
            "--train-samples", "64", "--val-samples", "32", "--batch-size", "16", "--epochs", "3",
            "--steps-per-epoch", "3", "--threads", "1", "--lr", "1e-3", "--no-progress", "--drop-path", "0.1",
            "--ema-decay", "0.9", "--device", "cpu", "--output", str(out), "--name", name]


def test_resume_after_kill_reproduces_losses(tmp_path):
    full = _cli(_args(tmp_path, "full"))
    assert full.returncode == 0, full.stderr
    killed = _cli(_args(tmp_path, "killed"), {"LARGEKERNEL_TEST_KILL_AT_STEP": "5"})  # mid epoch 2
    assert killed.returncode == -signal.SIGKILL
    state = load_state(tmp_path / "killed" / "last.pth")
    assert state["epoch"] == 1 and len(state["step_losses"]) == 3  # lost only the current epoch
    resumed = _cli(["train", "--resume", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert len(a["step_losses"]) == 9
    assert a["step_losses"] == b["step_losses"]  # bit-exact on CPU
    assert [e["val_loss"] for e in a["epochs"]] == [e["val_loss"] for e in b["epochs"]]
    # a finished run cannot be resumed, and a folder holding a run is not overwritten
    again = _cli(["train", "--resume", str(tmp_path / "full")])
    assert again.returncode == 2 and "already finished" in again.stderr and "Traceback" not in again.stderr
    clash = _cli(_args(tmp_path, "full"))
    assert clash.returncode == 2 and "--resume" in clash.stderr


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    model, tl, vl, meta = prepare(cfg)
    fit(model, tl, vl, TrainConfig(**{**TINY, "epochs": 1}), run_dir=tmp_path)
    good = (tmp_path / "last.pth").read_bytes()
    state = load_state(tmp_path / "last.pth")
    state["config"] = cfg.to_dict()
    for k, v in state["model"].items():
        if k.endswith("weight") and v.is_floating_point():
            v.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 4.*last good checkpoint kept"):
        fit(model, tl, vl, cfg, run_dir=tmp_path, resume_state=state)
    assert (tmp_path / "last.pth").read_bytes() == good


def test_finetune_new_head_and_layer_decay(tmp_path):
    src, *_ = prepare(TrainConfig(**{**TINY, "data": "digits", "data_kwargs": {}}))
    save_weights(tmp_path / "digits.safetensors", src, dict(model="replknet_test", num_classes=10, in_chans=1))
    cfg = TrainConfig(**{**TINY, "finetune": str(tmp_path / "digits.safetensors"), "layer_decay": 0.7,
                         "epochs": 1, "output": str(tmp_path), "name": "ft"})
    model, *_ = prepare(cfg)
    torch.testing.assert_close(model.stem[0].conv.weight, src.stem[0].conv.weight)
    assert model.head.out_features == 2
    result = train(cfg)
    assert result.metrics["deploy_matches"] and (tmp_path / "ft" / "deploy.safetensors").is_file()
    # layer-wise lr decay: the stem learns slower than the head
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, "adamw", lr=1.0, layer_decay=0.7)
    scales = sorted({g.get("lr_scale", 1.0) for g in opt.param_groups})
    assert scales[0] < 0.5 and scales[-1] == 1.0


def test_checkpoint_roundtrip_atomic_and_metadata(tmp_path):
    model, *_ = prepare(TrainConfig(**TINY))
    meta = dict(model="replknet_test", num_classes=2, in_chans=1, model_kwargs={}, img_size=32)
    save_weights(tmp_path / "m.safetensors", model, meta)
    assert not list(tmp_path.glob(".*tmp"))
    net, got = model_from_checkpoint(tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(net(x), model.eval()(x))
    assert got["num_classes"] == 2
    # a failing writer leaves the old file untouched
    before = (tmp_path / "m.safetensors").read_bytes()

    def boom(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "m.safetensors", boom)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))
    # pickles with code are refused by the safe loader
    import collections
    torch.save({"x": collections.OrderedDict(a=torch.ones(1)), "f": os.system}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a safe checkpoint"):
        load_weights(tmp_path / "evil.pth")


def test_grad_accumulation_matches_big_batch():
    base = {**TINY, "data_kwargs": {**TINY["data_kwargs"], "augment": False}, "epochs": 1, "steps_per_epoch": 2,
            "drop_path": 0.0}
    losses = []
    for bs, acc in ((16, 1), (8, 2)):
        # BN statistics differ with the micro-batch, so compare on a BN-free timm model
        cfg = TrainConfig(**{**base, "model": "convnext_atto", "batch_size": bs, "accum_steps": acc})
        model, tl, vl, _ = prepare(cfg)
        losses.append(fit(model, tl, None, cfg).step_losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_two_processes_match_one(tmp_path):
    common = ["--model", "convnext_atto", "--data-kwargs", "size=32", "length=20", "distractors=1", "scale=1",
              "augment=False",
              "--train-samples", "64", "--val-samples", "32", "--epochs", "1", "--steps-per-epoch", "3",
              "--threads", "1", "--no-progress", "--drop-path", "0", "--output", str(tmp_path), "--no-reparam",
              "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "largekernel.cli", "train", *common, "--batch-size", "16",
                          "--name", "one"], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "largekernel.cli", "train", *common, "--batch-size", "8", "--name", "two"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())["step_losses"]
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())["step_losses"]
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4)


def test_sparse_hook_keeps_masks(tmp_path):
    from largekernel.train.sparse import find_sparse_targets
    cfg = TrainConfig(**{**TINY, "epochs": 1, "sparse": 0.5, "sparse_kwargs": {"init": "uniform", "update_every": 1}})
    model, tl, vl, _ = prepare(cfg)
    result = fit(model, tl, vl, cfg, run_dir=tmp_path)
    assert result.sparsity.steps == 3
    assert abs(result.sparsity.current_density() - 0.5) < 0.05
    for t in find_sparse_targets(model):
        if t.name not in result.sparsity.dense_names:
            assert torch.all(t.param.detach()[(t.mask.expand_as(t.param) == 0)] == 0)
    assert load_state(tmp_path / "last.pth")["sparse"]["steps"] == 3


def test_evaluate_reports_accuracy_and_frees_plane_operators():
    """``evaluate`` counts top-1 against labels it was given (a model that always answers class 1: exactly the
    share of 1s) and afterwards drops the plane operators that inference kept (the weights change after it)."""
    import largekernel.ops.depthwise as dw
    from largekernel.train import evaluate

    class AlwaysOne(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 5.0]).expand(len(x), 2)

    weight = torch.zeros(1)
    dw.cached(dw._PLANE_OPERATORS, weight, (0,), lambda: torch.zeros(4))
    assert dw._PLANE_OPERATORS
    labels = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])
    res = evaluate(AlwaysOne(), [(torch.zeros(4, 3), labels[:4]), (torch.zeros(4, 3), labels[4:])])
    assert res["n"] == 8 and res["top1"] == 75.0 and "top5" not in res
    assert not dw._PLANE_OPERATORS
