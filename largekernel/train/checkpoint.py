"""Checkpoints: atomic writes, safe loading (safetensors / ``torch.load(weights_only=True)``), and model
rebuilding from the metadata stored with the weights.

Weights files are safetensors with string metadata: ``model`` (timm name), ``model_kwargs`` (JSON),
``num_classes``, ``in_chans``, ``img_size``, ``form`` ('train' | 'deploy' | 'ema') and ``data`` (JSON).
Training state for ``--resume`` (optimizer, scaler, EMA, RNG, history) is ``last.pth`` (tensors and plain
Python containers only, so ``weights_only=True`` loads it).
"""
from __future__ import annotations

import difflib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FORMAT = "largekernel"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_weights(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Atomically write ``model``'s state dict as safetensors with ``meta`` (JSON-encoded values)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # tied / shared storages are not allowed by safetensors: clone makes every tensor its own
    state = {k: v.clone() for k, v in state.items()}
    metadata = {k: json.dumps(v) for k, v in meta.items() if k not in ("format", "file")}
    metadata["format"] = FORMAT
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a training state (tensors and plain containers only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with a one-line ``ValueError`` for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a safe checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from e


def resolve_checkpoint(path: str | os.PathLike, form: str | None = None) -> Path:
    """A weights file from a file path or a run folder (``deploy.safetensors`` for form 'deploy', else
    ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        name = {"deploy": "deploy.safetensors", "ema": "model_ema.safetensors"}.get(form or "", "model.safetensors")
        cand = path / name
        if not cand.is_file():
            raise ValueError(f"run folder {str(path)!r} has no {name}")
        return cand
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from safetensors, or from a .pth/.pt/.bin file via ``weights_only`` torch.load
    (official releases; a ``model``/``state_dict`` wrapper is unwrapped; metadata is then empty)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import safe_open
        try:
            state, meta = {}, {}
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                for k in f.keys():
                    state[k] = f.get_tensor(k)
            for k, v in raw.items():
                try:
                    meta[k] = json.loads(v) if k != "format" else v
                except json.JSONDecodeError:
                    meta[k] = v
        except Exception as e:
            raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file "
                             f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from e
        return state, meta
    obj = load_state(path)
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def check_model_name(name: str) -> None:
    """``ValueError`` with close matches if ``name`` is not a registered timm model."""
    import timm

    import largekernel  # noqa: F401  (registers our models)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models()`"
        raise ValueError(f"unknown model {name!r}{hint}")


def check_model_kwargs(kwargs: dict) -> None:
    """``ValueError`` for None-valued model arguments, which ``timm.create_model`` would drop without a word."""
    nones = sorted(k for k, v in kwargs.items() if v is None)
    if nones:
        raise ValueError(f"model argument(s) {nones} = None would be silently ignored (timm.create_model drops "
                         "None-valued arguments); leave them out or use the model's own 'off' value")


def create_model(name: str, num_classes: int, in_chans: int = 3, drop_path_rate: float | None = None,
                 **kwargs) -> nn.Module:
    """``timm.create_model`` with one-line errors for unknown names and bad keyword arguments."""
    import timm
    check_model_name(name)
    check_model_kwargs(kwargs)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot build model {name!r} with {kwargs}: {msg}") from e


def _filter_fn(model: nn.Module):
    fn = getattr(model, "checkpoint_filter_fn", None)
    if fn is None:
        mod = sys.modules.get(type(model).__module__)
        fn = getattr(mod, "checkpoint_filter_fn", None)
    return fn


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier returned by ``get_classifier()`` (empty if none)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    prefixes = [name + "." for name, m in model.named_modules() if m is head and name]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str, new_head: bool = False) -> list[str]:
    """Load ``state`` into ``model`` strictly, with one-line errors naming the mismatch.

    new_head=True (fine-tuning): the model family's ``checkpoint_filter_fn`` is applied first, classifier
    weights of another shape are dropped and left freshly initialised; returns the keys left at init.
    """
    target = model.state_dict()
    if new_head:
        fn = _filter_fn(model)
        if fn is not None:
            try:
                state = fn(state, model)
            except Exception:  # a filter for another layout: fall back to the raw keys
                pass
        head = classifier_keys(model)
        state = {k: v for k, v in state.items() if not (k in head and k in target and v.shape != target[k].shape)}
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    allowed_missing = classifier_keys(model) if new_head else set()
    if wrong:
        k = wrong[0]
        raise ValueError(f"checkpoint {path!r} does not fit this model: {k} has shape {tuple(state[k].shape)}, "
                         f"model expects {tuple(target[k].shape)} (another model or class count?)")
    if unexpected or [k for k in missing if k not in allowed_missing]:
        bad = unexpected[:2] or [k for k in missing if k not in allowed_missing][:2]
        what = "unexpected" if unexpected else "missing"
        raise ValueError(f"checkpoint {path!r} does not fit this model: {what} keys {bad} "
                         f"({len(unexpected)} unexpected, {len(missing)} missing; another model?)")
    model.load_state_dict(state, strict=False)
    return missing


def model_from_checkpoint(path: str | os.PathLike, form: str | None = None, model: str | None = None,
                          num_classes: int | None = None, model_kwargs: dict | None = None,
                          in_chans: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from and load it (eval mode).

    Metadata written by ``largekernel train`` names the model; for other files pass ``model`` (and
    ``num_classes``/``in_chans``). Explicit arguments that contradict the metadata are an error.
    A 'deploy' checkpoint is loaded into the re-parameterized form.
    """
    from largekernel import reparameterize
    file = resolve_checkpoint(path, form)
    state, meta = load_weights(file)
    if meta.get("format") == FORMAT:
        for key, given in (("model", model), ("num_classes", num_classes), ("in_chans", in_chans)):
            if given is not None and meta.get(key) != given:
                raise ValueError(f"checkpoint {str(file)!r} is for {key}={meta.get(key)!r}, not {given!r}")
        name, ncls, chans = meta["model"], int(meta["num_classes"]), int(meta.get("in_chans", 3))
        kwargs = dict(meta.get("model_kwargs") or {})
        kwargs.update(model_kwargs or {})
        ckpt_form = meta.get("form", "train")
    else:
        if model is None:
            raise ValueError(f"checkpoint {str(file)!r} has no largekernel metadata: pass --model (and "
                             "--num-classes)")
        name, ncls, chans, kwargs = model, num_classes or 1000, in_chans or 3, dict(model_kwargs or {})
        ckpt_form = form or "train"
        meta = dict(model=name, num_classes=ncls, in_chans=chans, model_kwargs=kwargs, form=ckpt_form)
    net = create_model(name, ncls, chans, **kwargs)
    if ckpt_form == "deploy":
        net = reparameterize(net, inplace=True)
    if meta.get("format") != FORMAT:
        fn = _filter_fn(net)
        if fn is not None:
            try:
                state = fn(state, net)
            except Exception:
                pass
    load_into(net, state, str(file))
    meta["file"] = str(file)
    return net.eval(), meta
