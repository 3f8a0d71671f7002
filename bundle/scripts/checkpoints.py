"""Training checkpoints that are written atomically, never hold NaN weights, and let a killed run resume exactly."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from monai.transforms import Randomizable, Transform

from scripts.distributed import rank_and_world, unwrapped
from scripts.io import InputError, atomic_path, check_weights_fit


def inside_monai_label() -> bool:
    """Whether this training runs inside a MONAI Label server: its ``monaibundle`` app fine-tunes the bundle's
    ``models/model.pt`` in place and serves the result, so there the checkpoints go to ``models/``."""
    return "monailabel" in sys.modules


def _is_saving_rank() -> bool:
    return rank_and_world()[0] == 0


def save_atomically(content: dict, path: str | Path) -> None:
    """``torch.save`` through a temporary name and a rename: a kill leaves the previous file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(content, tmp)


def _model_state(network: torch.nn.Module, what: str) -> dict:
    state = unwrapped(network).state_dict()
    bad = [name for name, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        raise InputError(
            f"not saving {what}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]}); training diverged: lower "
            "--learning_rate, or check the inputs"
        )
    return state


def _numpy_state(state: tuple) -> tuple:
    """A NumPy generator state with its key array as a tensor, so that ``torch.load(weights_only=True)`` reads it."""
    return (state[0], torch.from_numpy(state[1].astype(np.int64)), *state[2:])


def _numpy_state_back(state: tuple) -> tuple:
    return (state[0], state[1].numpy().astype(np.uint32), *state[2:])


def _random_sources(roots: Sequence[object]) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``roots``: through datasets (``dataset``, ``patch_func``,
    ``patch_transform``, ``transform``) and through transforms' attributes, which include the inner random
    transforms that dictionary transforms wrap (e.g. ``RandCropByLabelClassesd.cropper``)."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        for name in ("dataset", "patch_func", "patch_transform", "transform"):
            visit(getattr(obj, name, None))
        if isinstance(obj, (Transform, Randomizable)):
            for value in vars(obj).values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, (Transform, Randomizable)):
                        visit(item)

    for root in roots:
        visit(root)
    return found


class TrainingCheckpoint:
    """Keep the whole training state in ``<save_dir>/model_last.pt``, and resume from it.

    The state (model, optimizer, step, epoch, training seconds, the validator's best metric, the weight average if
    any, and every random generator the windows and augmentations draw from) is written atomically at the end of an
    epoch once ``save_minutes`` have passed since the last save, and when training completes; never when it fails,
    and never with NaN weights (a diverged run stops with an error instead). With ``resume`` the state is loaded when
    the handler is attached, so that the run continues from the next epoch and, on a CPU, ends with the same weights
    as an uninterrupted run. Under torch.distributed only rank 0 saves, and the other ranks keep their own random state.

    Args:
        save_dir: the run's ``ckpt_dir``.
        network: the trained network (a ``DistributedDataParallel`` wrapper is saved without its prefix).
        optimizer: the optimizer.
        validator: the evaluator whose best metric is kept, if any.
        random_sources: objects whose MONAI random transforms are saved (the training dataset or data loader).
        resume: load the saved state before training starts.
        save_minutes: minimum minutes between two saves (0: every epoch).
        filename: the checkpoint's name in ``save_dir``.
        averaged: the running average of the weights (``scripts.handlers.WeightAverage``), if one is kept.
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        validator: Engine | None = None,
        random_sources: Sequence[object] = (),
        resume: bool = False,
        save_minutes: float = 5.0,
        filename: str = "model_last.pt",
        averaged: torch.nn.Module | None = None,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.network = network
        self.averaged = averaged
        self.optimizer = optimizer
        self.validator = validator
        self.random_sources = list(random_sources)
        self.resume = resume
        self.save_seconds = float(save_minutes) * 60.0
        self.resumed_seconds = 0.0
        self.start = 0.0
        self.last_save = 0.0

    def attach(self, trainer: Engine) -> None:
        if self.resume:
            self.load(trainer)
        trainer.add_event_handler(Events.STARTED, self.started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.check_loss)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self.save)

    def started(self, trainer: Engine) -> None:
        self.start = self.last_save = time.monotonic()

    def seconds(self) -> float:
        """Training seconds so far, those before a resume included."""
        return self.resumed_seconds + time.monotonic() - self.start

    def check_loss(self, trainer: Engine) -> None:
        loss = from_engine(["loss"], first=True)(trainer.state.output)
        if not math.isfinite(float(loss)):
            raise InputError(
                f"training diverged at step {trainer.state.iteration}: the loss is {float(loss)}; nothing was saved "
                "from this step on: lower --learning_rate, or check the inputs"
            )

    def epoch_completed(self, trainer: Engine) -> None:
        if time.monotonic() - self.last_save >= self.save_seconds:
            self.save(trainer)

    def save(self, trainer: Engine) -> None:
        if not _is_saving_rank():
            return
        state = {
            "model": _model_state(self.network, str(self.path)),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration, "seconds": self.seconds()},
            "random": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(np.random.get_state()),
                "python": random.getstate(),
                "transforms": [_numpy_state(source.R.get_state()) for source in _random_sources(self.random_sources)],
            },
        }
        if self.averaged is not None:
            state["averaged"] = _model_state(self.averaged, str(self.path))
        if self.validator is not None:
            state["best"] = {
                "metric": float(self.validator.state.best_metric),
                "epoch": int(self.validator.state.best_metric_epoch),
            }
        save_atomically(state, self.path)
        self.last_save = time.monotonic()

    def load(self, trainer: Engine) -> None:
        """Restore the saved state into the network, optimizer, trainer, validator and random generators."""
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if "trainer" not in state:
            raise InputError(f"--resume True: {self.path} holds weights only, not a training state to resume")
        check_weights_fit(unwrapped(self.network), state["model"], str(self.path))
        if trainer.state.max_epochs is not None and state["trainer"]["epoch"] >= trainer.state.max_epochs:
            raise InputError(
                f"--resume True: {self.path} finished its {state['trainer']['epoch']} epochs already: raise "
                "--max_epochs to train on"
            )
        if (self.averaged is not None) != ("averaged" in state):
            raise InputError(
                f"--resume True: {self.path} was saved {'with' if 'averaged' in state else 'without'} a weight "
                "average (weight_average_decay): resume with the same config files and overrides"
            )
        unwrapped(self.network).load_state_dict(state["model"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        self.optimizer.load_state_dict(state["optimizer"])
        trainer.state.epoch = state["trainer"]["epoch"]
        trainer.state.iteration = state["trainer"]["iteration"]
        trainer.state.resumed_seconds = self.resumed_seconds = state["trainer"]["seconds"]
        if self.validator is not None and "best" in state:
            self.validator.state.best_metric = state["best"]["metric"]
            self.validator.state.best_metric_epoch = state["best"]["epoch"]
        if _is_saving_rank():
            torch.set_rng_state(state["random"]["torch"])
            np.random.set_state(_numpy_state_back(state["random"]["numpy"]))
            random.setstate(state["random"]["python"])
            sources = _random_sources(self.random_sources)
            if len(sources) != len(state["random"]["transforms"]):
                raise InputError(
                    f"--resume True: {self.path} was saved with {len(state['random']['transforms'])} random "
                    f"transforms, this run has {len(sources)}: resume with the same config files and overrides"
                )
            for source, saved in zip(sources, state["random"]["transforms"]):
                source.R.set_state(_numpy_state_back(saved))
        print(f"resuming {self.path}: epoch {trainer.state.epoch}, step {trainer.state.iteration}", flush=True)


class BestCheckpoint:
    """Save the weights (a state dict) atomically to ``<save_dir>/model.pt`` whenever validation sets a new best.

    Attach to the evaluator. It reads MONAI's ``best_metric``/``best_metric_epoch`` bookkeeping, which
    :class:`TrainingCheckpoint` restores on resume, so a resumed run never replaces a better model with a worse one.

    Args:
        save_dir: the run's ``ckpt_dir``.
        network: the network validated.
        filename: the checkpoint's name in ``save_dir``.
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt") -> None:
        self.path = Path(save_dir) / filename
        self.network = network

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        state = evaluator.state
        metric = state.metrics.get(state.key_metric_name)
        if metric is None or state.best_metric_epoch != state.epoch or metric != state.best_metric:
            return
        if _is_saving_rank():  # the bare state dict, as model-zoo bundles ship model.pt
            save_atomically(_model_state(self.network, str(self.path)), self.path)
