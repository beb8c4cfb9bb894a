"""`largekernel` CLI end to end on tiny settings, and every bad input giving one line and a nonzero exit."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from largekernel.cli import COMMANDS, PLUGINS, main

TRAIN = ["train", "--model", "replknet_test", "--data-kwargs", "size=32", "length=20", "distractors=1",
         "scale=1", "--train-samples", "48", "--val-samples", "16", "--batch-size", "8", "--epochs", "1",
         "--steps-per-epoch", "2", "--threads", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LARGEKERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LARGEKERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    assert main([*TRAIN, "--output", str(out), "--name", "tiny"]) == 0
    mp.undo()
    return out / "tiny"


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert "error:" in last, err
    for n in needles:
        assert n in last, last
    return last


def test_train_writes_run_folder(run, capsys):
    for f in ("config.json", "metrics.csv", "metrics.json", "last.pth", "model.safetensors", "deploy.safetensors",
              "curves.png"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["step_losses"]) == 2 and m["summary"]["deploy_matches"] is True
    assert m["summary"]["deploy_params"] < m["summary"]["params"]  # branches merged
    assert json.loads((run / "config.json").read_text())["model"] == "replknet_test"
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,train_loss")


def test_eval_both_forms_agree(run, capsys):
    assert main(["eval", str(run)]) == 0
    a = capsys.readouterr().out
    assert main(["eval", str(run), "--form", "deploy"]) == 0
    b = capsys.readouterr().out
    def field(text: str, key: str) -> str:
        return [line for line in text.splitlines() if key in line][0].split("|")[2].strip()
    assert field(a, "top-1") == field(b, "top-1") and field(a, "loss") == field(b, "loss")
    assert field(a, "images") == "16" and "deploy form" in b


def test_reparam_verifies(run, capsys, tmp_path):
    assert main(["reparam", str(run / "model.safetensors"), "-o", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "equivalent" in out and "NOT" not in out and "pathfinder (val)" in out
    from largekernel.train import model_from_checkpoint
    dep, meta = model_from_checkpoint(tmp_path / "d.safetensors")
    train_m, _ = model_from_checkpoint(run / "model.safetensors")
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(dep(x), train_m(x), rtol=1e-4, atol=1e-5)
    assert meta["form"] == "deploy"


def test_export_onnx_matches_onnxruntime(run, capsys, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "-o", str(out)]) == 0
    assert "match" in capsys.readouterr().out
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    from largekernel.train import model_from_checkpoint
    m, _ = model_from_checkpoint(run, form="deploy")
    x = torch.rand(5, 1, 32, 32)  # another batch size than the export batch: the batch axis is dynamic
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, m(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_info(capsys):
    assert main(["info", "replknet_micro", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "13x13" in out and "7x7" in out and "MACs" in out and "-> native" in out
    assert main(["info", "resnet10t", "--img-size", "32"]) == 0
    assert re.search(r"depthwise convs +\| 0 ", capsys.readouterr().out)


def test_bench(capsys):
    assert main(["bench", "replknet_test", "--peer", "resnet10t", "--img-size", "32", "--batch-size", "2",
                 "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "replknet_test" in out and "resnet10t" in out and "img/s" in out


def test_subcommand_table_is_extensible():
    assert {"train", "eval", "reparam", "export", "info", "bench"} <= set(COMMANDS)
    assert "erf" in PLUGINS


@pytest.mark.parametrize("args,needles", [
    (["train", "--model", "replknet_mikro"], ("unknown model", "replknet_micro")),
    (["train", "--batch-size", "0"], ("batch_size",)),
    (["train", "--epochs", "0"], ("epochs",)),
    (["train", "--lr", "-1"], ("lr",)),
    (["train", "--amp", "fp16", "--device", "cpu", "--train-samples", "16", "--val-samples", "8"], ("fp16",)),
    (["train", "--mixup", "0.8"], ("mixup",)),
    (["train", "--data", "nope"], ("unknown dataset",)),
    (["train", "--model-kwargs", "large_kernel_sizes=(4,4,4,4)", "--train-samples", "16", "--val-samples", "8"],
     ("cannot build model",)),
    (["train", "--resume", "/nonexistent/run"], ("does not exist",)),
    (["train", "--model-kwargs", "small_kernel=None"], ("silently ignored",)),
    (["eval", "/nonexistent/x.safetensors"], ("does not exist",)),
    (["info", "not_a_model"], ("unknown model",)),
    (["train", "--cuda-graph", "--device", "cpu"], ("cuda_graph", "CUDA device")),
    (["train", "--cuda-graph", "--accum-steps", "2"], ("cuda_graph", "accum_steps=2")),
    (["train", "--cuda-graph", "--opt", "sgd"], ("cuda_graph", "opt='sgd'")),
])
def test_bad_input_one_line(args, needles, capsys):
    _one_line_error(capsys, main(args), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_graph_without_a_gpu_is_one_line(tmp_path, capsys):
    args = [a if a != "cpu" else "auto" for a in TRAIN]
    _one_line_error(capsys, main([*args, "--cuda-graph", "--output", str(tmp_path)]), "cuda_graph", "CUDA device")


def test_graphed_step_rejects_optimizers_it_cannot_capture():
    from largekernel.train.graph import GraphedTrainStep

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="adam"):
        GraphedTrainStep(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                         lambda cache: torch.autocast("cpu", enabled=False))


def test_graphed_step_makes_a_resumed_optimizer_capturable():
    # --resume loads the optimizer state after the step object exists; a state saved by an eager run restores
    # capturable=False, which a capture refuses: the first call turns it back on
    from largekernel.train.graph import GraphedTrainStep

    model = torch.nn.Linear(3, 2)
    eager = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    eager.step()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    step = GraphedTrainStep(model, torch.nn.functional.cross_entropy, opt,
                            lambda cache: torch.autocast("cpu", enabled=False))
    opt.load_state_dict(eager.state_dict())
    assert not any(g["capturable"] for g in opt.param_groups)
    step._make_capturable()
    assert all(g["capturable"] for g in opt.param_groups)
    assert all(st["step"].device == p.device for p, st in opt.state.items())


def test_bad_data_folders(tmp_path, capsys):
    _one_line_error(capsys, main(["train", "--data", "folder", "--data-dir", str(tmp_path / "missing")]),
                    "does not exist")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, main(["train", "--data", str(tmp_path / "empty")]), "no class sub-folders")


def test_bad_checkpoints(run, tmp_path, capsys):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _one_line_error(capsys, main(["eval", str(tmp_path / "corrupt.safetensors")]), "corrupt")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 this is not a zip")
    _one_line_error(capsys, main(["eval", str(tmp_path / "corrupt.pth"), "--model", "replknet_test"]), "corrupt")
    # checkpoint of another model / class count
    _one_line_error(capsys, main(["eval", str(run), "--model", "replknet_micro"]), "model='replknet_test'")
    _one_line_error(capsys, main(["eval", str(run), "--num-classes", "10"]), "num_classes=2")
    _one_line_error(capsys, main(["eval", str(run / "model.safetensors"), "--data", "digits"]), "classes")
    # weights that do not fit the model named on the command line (no metadata)
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    _one_line_error(capsys, main(["eval", str(tmp_path / "plain.safetensors"), "--model", "replknet_test",
                                  "--num-classes", "2", "--in-chans", "1", "--data", "pathfinder"]), "does not fit")
    _one_line_error(capsys, main([*TRAIN, "--finetune", str(tmp_path / "plain.safetensors")]), "does not fit")


def test_nan_loss_is_one_line(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    state = load_file(str(run / "model.safetensors"))
    state = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(tmp_path / "nan.safetensors"))
    code = main([*TRAIN, "--finetune", str(tmp_path / "nan.safetensors"), "--output", str(tmp_path)])
    _one_line_error(capsys, code, "loss became nan")


def test_argparse_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid int value" in err


def test_train_options_amp_ema_accum_checkpointing(tmp_path, capsys):
    code = main([*TRAIN, "--amp", "bf16", "--channels-last", "--grad-checkpointing", "--ema-decay", "0.9",
                 "--accum-steps", "2", "--label-smoothing", "0.1", "--clip-grad", "1.0", "--drop-path", "0.1",
                 "--output", str(tmp_path), "--name", "opts"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "opts" / "metrics.json").read_text())
    assert len(m["step_losses"]) == 2 and "val_ema_top1" in m["epochs"][0]
    assert (tmp_path / "opts" / "model_ema.safetensors").is_file()
    assert m["summary"]["deploy_matches"] is True


def test_train_and_eval_on_image_folder(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    code = main(["train", "--model", "replknet_test", "--data", str(tmp_path / "data"), "--img-size", "32",
                 "--batch-size", "4", "--epochs", "1", "--no-progress", "--output", str(tmp_path), "--name", "f"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert m["epochs"][0]["skipped_images"] >= 1  # counted, not fatal
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "f"), "--form", "deploy"]) == 0
    assert "images     | 16" in capsys.readouterr().out
