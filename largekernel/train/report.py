"""End of a run: checkpoints, re-parameterization check, curves, summary table."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from largekernel.train.checkpoint import save_weights
from largekernel.train.config import TrainConfig


@torch.no_grad()
def compare_forms(train_model: nn.Module, deploy_model: nn.Module, loader, device: torch.device,
                  max_batches: int = 4) -> dict[str, float]:
    """Max |logit difference| (absolute, and relative to the logits' max magnitude) and prediction agreement
    between the training form (eval mode) and the deploy form on up to ``max_batches`` real batches."""
    train_model.eval()
    deploy_model.eval()
    diff = scale = 0.0
    agree = n = 0
    for i, (x, _) in enumerate(loader):
        if i >= max_batches:
            break
        x = x.to(device)
        a, b = train_model(x).float(), deploy_model(x).float()
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        agree += (a.argmax(1) == b.argmax(1)).sum().item()
        n += len(x)
    return dict(max_abs_diff=diff, rel_diff=diff / max(scale, 1e-12), agreement=100.0 * agree / max(n, 1))


def plot_curves(run_dir: Path, history: list[dict[str, Any]], step_losses: list[float], title: str) -> Path:
    """curves.png: per-step training loss, per-epoch validation loss and top-1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    spe = len(step_losses) / max(len(history), 1)
    ax1.plot([i / spe for i in range(1, len(step_losses) + 1)], step_losses, lw=0.6, alpha=0.6, label="train (step)")
    ep = [h["epoch"] for h in history]
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train (epoch mean)")
    if history and "val_loss" in history[0]:
        ax1.plot(ep, [h["val_loss"] for h in history], "s-", label="val")
        ax2.plot(ep, [h["val_top1"] for h in history], "s-", label="val top-1")
        if "val_ema_top1" in history[0]:
            ax2.plot(ep, [h["val_ema_top1"] for h in history], "^-", label="val top-1 (EMA)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1 (%)")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    v = max(len(str(val)) for _, val in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
    body = [f"| {k:<{w}} | {str(val):<{v}} |" for k, val in rows]
    return "\n".join([line, *body, line])


def finish_run(result, cfg: TrainConfig, meta: dict[str, Any], val_loader, device: torch.device) -> None:
    """Save model.safetensors (+ EMA), re-parameterize, evaluate and compare the deploy form, save
    deploy.safetensors, write metrics with a summary, plot curves.png and print the summary table."""
    from largekernel import reparameterize
    from largekernel.train.engine import evaluate, write_metrics
    run_dir: Path = result.run_dir
    model = result.model.eval()
    epoch = result.history[-1]["epoch"] if result.history else 0
    files = {}
    files["model"] = str(run_dir / "model.safetensors")
    save_weights(files["model"], model, {**meta, "form": "train", "epoch": epoch})
    if result.ema_model is not None:
        files["model_ema"] = str(run_dir / "model_ema.safetensors")
        save_weights(files["model_ema"], result.ema_model, {**meta, "form": "train", "epoch": epoch, "ema": True})
    summary: dict[str, Any] = dict(result.metrics)
    summary["params"] = sum(p.numel() for p in model.parameters())
    if cfg.reparam:
        deploy = reparameterize(model, inplace=False)
        ev = evaluate(deploy, val_loader, device, cfg.amp, cfg.channels_last, progress=cfg.progress,
                      desc="eval deploy")
        cmp = compare_forms(model, deploy, val_loader, device)
        tol = 1e-3 if cfg.amp == "none" else 5e-2
        summary.update({"deploy_val_top1": ev["top1"], "deploy_val_loss": ev["loss"],
                        "deploy_params": sum(p.numel() for p in deploy.parameters()),
                        "deploy_max_abs_diff": cmp["max_abs_diff"], "deploy_rel_diff": cmp["rel_diff"],
                        "deploy_agreement": cmp["agreement"],
                        "deploy_matches": bool(cmp["rel_diff"] < tol
                                               and abs(ev["top1"] - summary.get("val_top1", ev["top1"])) < 0.5)})
        files["deploy"] = str(run_dir / "deploy.safetensors")
        save_weights(files["deploy"], deploy, {**meta, "form": "deploy", "epoch": epoch})
        result.deploy_model = deploy
    files["curves"] = str(plot_curves(run_dir, result.history, result.step_losses,
                                      f"{cfg.model} on {cfg.data}"))
    files.update(config=str(run_dir / "config.json"), metrics_csv=str(run_dir / "metrics.csv"),
                 metrics_json=str(run_dir / "metrics.json"), state=str(run_dir / "last.pth"))
    result.files = files
    result.metrics = summary
    write_metrics(run_dir, result.history, result.step_losses, summary)
    print_summary(result, cfg)


def print_summary(result, cfg: TrainConfig, file=None) -> None:
    m = result.metrics
    rows = [("model", f"{cfg.model} {cfg.model_kwargs or ''}".strip()),
            ("data", f"{cfg.data} (val n={m.get('val_n', '')})".replace(" (val n=)", "")),
            ("params", f"{m.get('params', 0) / 1e6:.3f} M"),
            ("epochs / steps", f"{m.get('epoch', '?')} / {m.get('step', '?')}"),
            ("train time", f"{m.get('train_time_s', 0):.0f} s"),
            ("train loss (last epoch)", f"{m.get('train_loss', float('nan')):.4f}")]
    if "val_top1" in m:
        rows += [("val loss", f"{m['val_loss']:.4f}"), ("val top-1 (training form)", f"{m['val_top1']:.2f} %")]
    if "val_top5" in m:
        rows.append(("val top-5", f"{m['val_top5']:.2f} %"))
    if "val_ema_top1" in m:
        rows.append(("val top-1 (EMA)", f"{m['val_ema_top1']:.2f} %"))
    if "deploy_val_top1" in m:
        rows += [("val top-1 (deploy form)", f"{m['deploy_val_top1']:.2f} %"),
                 ("deploy vs training max|diff|", f"{m['deploy_max_abs_diff']:.2e} (rel {m['deploy_rel_diff']:.1e})"),
                 ("deploy matches training", "yes" if m["deploy_matches"] else "NO"),
                 ("deploy params", f"{m['deploy_params'] / 1e6:.3f} M")]
    if m.get("skipped_images"):
        rows.append(("unreadable images skipped", str(m["skipped_images"])))
    rows.append(("run folder", str(result.run_dir)))
    print(format_table(rows), file=file or sys.stdout, flush=True)
