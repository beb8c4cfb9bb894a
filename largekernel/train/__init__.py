"""Training and evaluation.

    from largekernel.train import TrainConfig, train, fit, evaluate, prepare
    result = train(TrainConfig())                      # the embedded default job (`largekernel train`)
    result = train(resume="runs/<run>")                # continue a killed run exactly
    model, train_loader, val_loader, meta = prepare(TrainConfig(model="resnet10t", data="digits"))
    result = fit(model, train_loader, val_loader, TrainConfig(epochs=3))   # any model, any loaders
    evaluate(model, val_loader)                        # {'top1', 'top5', 'loss', 'n'}

See :class:`TrainConfig` for every option and :class:`RunResult` for what comes back.
"""
from largekernel.train.checkpoint import (
    create_model,
    load_state,
    load_weights,
    model_from_checkpoint,
    save_state,
    save_weights,
)
from largekernel.train.config import TrainConfig
from largekernel.train.engine import RunResult, TrainingDiverged, evaluate, fit, prepare, train

__all__ = [
    "RunResult", "TrainConfig", "TrainingDiverged", "create_model", "evaluate", "fit", "load_state", "load_weights",
    "model_from_checkpoint", "prepare", "save_state", "save_weights", "train",
]
