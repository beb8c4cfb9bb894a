"""CUDA-graph capture of whole models: does a captured training step / deploy forward replay correctly, and how
fast is it against the eager step?

    PYTHONPATH=. python3 benchmarks/graph_check.py                       # the default matrix, one process per case
    PYTHONPATH=. python3 benchmarks/graph_check.py --case replknet_31b:train:auto:64

A case is ``model:mode:backend:batch``; mode ``train`` (one SGD step under bf16 autocast, training form), ``infer``
(deploy form, no_grad), or ``train+tiny`` / ``train+copy`` / ``train+infer`` (a second capture or deploy copy made
before the training step's replays, see ``_second_capture``). Each case runs in its own process (an illegal memory
access poisons the CUDA context), with PyTorch's whole-network recipe: warm-up steps on a side stream (these compile
and tune our kernels), one capture, replays. Correctness: from the same initial state, three replays and three eager
steps must give the same losses and change the parameters alike (training), or give the same logits (inference).
``--sanitize`` also runs the eager step of each of our models at a small batch under ``compute-sanitizer`` with
PyTorch's caching allocator off, so that any out-of-bounds access of a kernel is reported with the kernel's name.
Writes ``$OUT/graph_check.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CASES = [
    "replknet_31b:train:auto:64", "replknet_31b:train:native:64", "replknet_31b:infer:auto:128",
    "swin_base_patch4_window7_224:train:-:64", "swin_base_patch4_window7_224:infer:-:128",
]


def _build(name: str, mode: str, batch: int):
    import timm
    from models import deploy_form

    import largekernel  # noqa: F401 - registers our models

    torch.manual_seed(0)
    # no stochastic depth: replays and eager steps draw different random numbers, so they would not compare
    model = timm.create_model(name, num_classes=1000, drop_path_rate=0.0).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    if mode.startswith("train"):
        return model.train(), x
    return deploy_form(name, model.eval(), "mixed"), x


def run_case(spec: str, iters: int) -> dict:
    from _timing import cuda_time
    from models import graphed, infer_step, train_step

    from largekernel.ops.dispatch import use_backend

    name, mode, backend, batch = spec.split(":")
    out: dict = {"case": spec}
    with use_backend("auto" if backend == "-" else backend):
        model, x = _build(name, mode, int(batch))
        if mode == "infer":
            eager = infer_step(model, x)
            ref = eager().float()
            replay = graphed(infer_step(model, x, cache=False))
            got = replay().float()
            out["rel_err"] = float((got - ref).norm() / ref.norm())
        else:
            y = torch.randint(0, 1000, (x.shape[0],), device="cuda")
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            start = {k: v.clone() for k, v in model.state_dict().items()}
            eager = train_step(model, x, y, opt)
            replay = graphed(train_step(model, x, y, opt, zero_grad=False),
                             before_capture=lambda: opt.zero_grad(set_to_none=True))
            if mode != "train":   # a second capture after the training step's (bisecting a crash of its replay)
                _second_capture(mode, name, model, x)
            out.update(_compare_steps(model, opt, start, replay, eager))
        out["eager_ms"] = cuda_time(eager, iters, 0, 3)
        out["graph_ms"] = cuda_time(replay, iters, 0, 3)
        out["speedup"] = out["eager_ms"] / out["graph_ms"]
    return out


def _second_capture(mode: str, name: str, model, x) -> None:
    """train+tiny: a trivial second graph; train+copy: a deploy copy of the model (no graph); train+infer: a deploy
    copy and its forward captured (what models.py --cuda-graph does)."""
    import copy

    from models import deploy_form, graphed, infer_step

    if mode == "train+tiny":
        t = torch.ones(16, device="cuda")
        graphed(lambda: t * 2)
        return
    deploy = deploy_form(name, copy.deepcopy(model).eval())
    if mode == "train+infer":
        graphed(infer_step(deploy, torch.randn_like(x[:8]), cache=False))


def _compare_steps(model, opt, start: dict, replay, eager) -> dict:
    """Three replays vs three eager steps from the same state: the losses, and the parameter change
    (||d_graph - d_eager|| / ||d_eager||)."""
    def reset():
        with torch.no_grad():   # in place: the captured graph keeps its addresses
            for k, v in model.state_dict().items():
                v.copy_(start[k])
            for st in opt.state.values():
                if st.get("momentum_buffer") is not None:
                    st["momentum_buffer"].zero_()
        torch.cuda.synchronize()

    params = dict(model.named_parameters())
    reset()
    graph_losses = [float(replay()) for _ in range(3)]
    got = {k: p.detach().clone() for k, p in params.items()}
    reset()
    opt.zero_grad(set_to_none=True)   # the graph's static grads would otherwise accumulate the eager backward
    eager_losses = [float(eager()) for _ in range(3)]
    num = sum(float((got[k] - p).double().norm() ** 2) for k, p in params.items())
    den = sum(float((p.detach() - start[k]).double().norm() ** 2) for k, p in params.items())
    worst = max(params, key=lambda k: float((got[k] - params[k]).double().norm()))
    return {"rel_err": (num / max(den, 1e-30)) ** 0.5, "graph_losses": graph_losses, "eager_losses": eager_losses,
            "worst_param": worst}


def _sanitize(name: str, batch: int, timeout: int) -> dict:
    """The eager training step of ``name`` under compute-sanitizer memcheck (caching allocator off)."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import torch, models; "
            f"m, x = __import__('graph_check')._build({name!r}, 'train', {batch}); "
            "y = torch.randint(0, 1000, (x.shape[0],), device='cuda'); "
            "opt = torch.optim.SGD(m.parameters(), lr=0.1); s = models.train_step(m, x, y, opt); "
            "s(); s(); torch.cuda.synchronize(); print('sanitized step ok')")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", LARGEKERNEL_TUNE="0")
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "20", sys.executable, "-c", code]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        text = (p.stdout + p.stderr)[-4000:]
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = ((e.stdout or b"").decode()[-2000:] if isinstance(e.stdout, bytes) else str(e.stdout)[-2000:]), 124
    return {"sanitize": name, "batch": batch, "rc": rc, "s": round(time.time() - t0, 1), "tail": text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help="run one case in this process and print its JSON")
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--timeout", type=int, default=240, help="seconds per case")
    p.add_argument("--sanitize", nargs="*", default=[], help="our models to run under compute-sanitizer")
    p.add_argument("--sanitize-batch", type=int, default=2)
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.iters)), flush=True)
        return 0
    results = []
    for spec in args.cases:
        t0 = time.time()
        try:
            cmd = [sys.executable, "-X", "faulthandler", __file__, "--case", spec, "--iters", str(args.iters)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"case": spec, "error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"case": spec, "error": f"timeout after {args.timeout} s"}
        row["wall_s"] = round(time.time() - t0, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        _save(results)
    for name in args.sanitize:
        results.append(_sanitize(name, args.sanitize_batch, args.timeout))
        print(json.dumps(results[-1]), flush=True)
        _save(results)
    return 0


def _save(results: list[dict]) -> None:
    """After every case, so that a run cut off by its time limit keeps what it has."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "graph_check.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
