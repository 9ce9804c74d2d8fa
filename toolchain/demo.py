"""The built-in default scenario: a torchvision ResNet18 trained on the embedded digits, cached.

First run trains it (deterministic: fixed seeds, fixed split; about 3 minutes on 2 cores), later runs
reuse the cached edgec model file. Cache: $EDGEC_CACHE or ~/.cache/edgec.
"""
from __future__ import annotations

import os
from pathlib import Path

from edgec.models.zoo import DEMO_ARCH, DEMO_INPUT_SHAPE

DEMO_EPOCHS = 8
DEMO_LR = 0.03   # picked on the validation split among 0.02/0.03/0.05 (0.05 swung by a point between seeds)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEC_CACHE") or Path.home() / ".cache" / "edgec")


def demo_model_path() -> Path:
    # the name changes with the recipe, so a cache from an older recipe is never taken for this one
    return cache_dir() / "demo" / f"resnet18-digits-e{DEMO_EPOCHS}-lr{DEMO_LR}.pt"


def demo_model(retrain: bool = False) -> Path:
    """Path of the trained demo ResNet18 (an edgec model file), training it if not cached."""
    from edgec.data import load_data
    from edgec.modelio import build_arch, save_model
    from edgec.source import training_split
    from edgec.core.progress import note
    from edgec.train import TrainConfig, train

    path = demo_model_path()
    if path.is_file() and not retrain:
        return path
    note(f"training the demo ResNet18 on builtin:digits ({DEMO_EPOCHS} epochs, cached in {path.parent})")
    import torch
    torch.manual_seed(0)  # the initial weights too: without it two first runs train two different models
    model = build_arch(DEMO_ARCH)
    cfg = TrainConfig(epochs=DEMO_EPOCHS, lr=DEMO_LR, seed=0)
    # the test split stays unseen until the build measures it
    train_data, validation = training_split(load_data("builtin:digits:train"))
    record = train(model, train_data, cfg, eval_data=validation, label="demo training")
    save_model(path, model, DEMO_ARCH, DEMO_INPUT_SHAPE, force=True,
               history=[{"stage": "train", "data": "builtin:digits:train", **record}])
    return path
