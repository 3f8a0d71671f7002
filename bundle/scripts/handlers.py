"""Ignite handlers of the paper's training protocol that MONAI lacks."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from scripts.distributed import unwrapped
from scripts.io import write_json_atomically

logger = logging.getLogger(__name__)


class MinimumMetricStopper:
    """Stop a training instance that has not reached ``threshold`` of the key validation metric by ``epochs``.

    The paper stops instances whose eval MIoU is still below 0.3 after 10 epochs: they rarely recover, and the
    time is better spent on another seed. Attach to the trainer; it reads the validator's best metric.

    Args:
        validator: the evaluator whose ``best_metric`` is checked.
        threshold: minimum best metric required.
        epochs: training epoch from which the rule applies.
    """

    def __init__(self, validator: Engine, threshold: float = 0.3, epochs: int = 10) -> None:
        self.validator = validator
        self.threshold = threshold
        self.epochs = epochs

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        best = getattr(self.validator.state, "best_metric", None)
        if trainer.state.epoch >= self.epochs and best is not None and best < self.threshold:
            logger.warning(
                f"stopping: best validation metric {best:.4f} < {self.threshold} after {trainer.state.epoch} epochs"
            )
            trainer.terminate()


class ValidateAtEnd:
    """Run the validator once more when training ends between two iteration-level validations.

    MONAI's ``ValidationHandler(epoch_level=False)`` validates every ``interval`` iterations only, so a run whose
    length is not a multiple of the interval would otherwise never score (nor checkpoint) its last weights.

    Args:
        validator: the evaluator to run.
        interval: the iteration interval of the regular validation.
    """

    def __init__(self, validator: Engine, interval: int) -> None:
        self.validator = validator
        self.interval = interval

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        if trainer.state.iteration % self.interval != 0:
            self.validator.run(trainer.state.epoch)


class WeightAverage:
    """Keep ``averaged`` an exponential moving average of the trained weights (Polyak averaging), to be validated and
    saved in their place.

    After every step ``average = d * average + (1 - d) * weights``, with ``d = min(decay, (1 + t) / (10 + t))`` at
    step ``t``: the first steps' weights fade fast (the warm-up of timm's ``ModelEmaV2``). With ``decay`` 0.999 the
    warm-up rules the first 8990 steps, so the average's memory, ``1 / (1 - d)``, grows as ``(10 + t) / 9`` steps
    through runs of a few thousand. Floating-point buffers (batch-norm statistics) are averaged alike, the others
    copied. Attach to the trainer before the validation handler, so that a validation sees the step it follows.

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is averaged without it).
        averaged: the average, made by :meth:`averaged_copy` with the same ``decay``.
        decay: the largest decay a step; None or 0 turns averaging off.
    """

    def __init__(self, network: torch.nn.Module, averaged: torch.nn.Module, decay: float | None = None) -> None:
        self.decay = self._checked(decay)
        self.averaged = averaged
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._others: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not self.decay:  # ``averaged`` is then ``network`` itself, perhaps wrapped by DDP
            return
        # the tensors themselves, listed once: training and resuming update them in place
        averaged_state, trained_state = averaged.state_dict(), unwrapped(network).state_dict()
        floats = [name for name, value in averaged_state.items() if value.is_floating_point()]
        others = [name for name in averaged_state if name not in floats]
        self._floats = ([averaged_state[n] for n in floats], [trained_state[n] for n in floats])
        self._others = [(averaged_state[n], trained_state[n]) for n in others]

    @staticmethod
    def _checked(decay: float | None) -> float:
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"weight_average_decay must be in [0, 1) or null, got {decay}")
        return decay or 0.0

    @staticmethod
    def averaged_copy(network: torch.nn.Module, decay: float | None = None) -> torch.nn.Module:
        """A frozen copy of ``network`` to hold the average, or ``network`` itself when averaging is off."""
        return copy.deepcopy(unwrapped(network)).requires_grad_(False) if WeightAverage._checked(decay) else network

    def attach(self, trainer: Engine) -> None:
        if self.decay:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, trainer: Engine) -> None:
        step = trainer.state.iteration
        weight = 1.0 - min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(*self._floats, weight)
        for average, trained in self._others:
            average.copy_(trained)


class TimeLimit:
    """Stop training after ``max_minutes`` of wall-clock time (validation included), at the end of a step.

    Ignite then fires ``COMPLETED``: :class:`ValidateAtEnd` scores the last weights and the checkpoint savers keep
    the best and the last model, exactly as at the end of a run that reached ``max_epochs``. The trainer's
    ``state.time_limit_reached`` tells the two ends apart.

    Args:
        max_minutes: the budget in minutes; ``None`` or a value <= 0 means no limit.
    """

    def __init__(self, max_minutes: float | None) -> None:
        self.max_seconds = None if max_minutes is None or max_minutes <= 0 else float(max_minutes) * 60.0
        self.start: float | None = None

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)

    def started(self, trainer: Engine) -> None:
        # a resumed run (scripts.checkpoints.TrainingCheckpoint) has spent part of its budget already
        self.start = time.monotonic() - getattr(trainer.state, "resumed_seconds", 0.0)
        trainer.state.time_limit_reached = False

    def elapsed_fraction(self) -> float:
        """Share of the budget spent so far (0 without a limit or before the start)."""
        if self.max_seconds is None or self.start is None:
            return 0.0
        return (time.monotonic() - self.start) / self.max_seconds

    def __call__(self, trainer: Engine) -> None:
        if self.elapsed_fraction() >= 1.0:
            logger.warning(
                f"stopping: time limit of {self.max_seconds / 60:g} min reached after {trainer.state.iteration} steps"
            )
            trainer.state.time_limit_reached = True
            trainer.terminate()


class WarmupPolyLR:
    """Linear warm-up then polynomial decay, ``lr = base_lr * (1 - progress) ** power``, set before every step.

    ``progress`` is the larger of the share of steps done (of ``max_epochs * epoch_length``) and the share of the
    time budget spent (``max_minutes``, the same budget as the run's :class:`TimeLimit`), so the rate reaches zero
    when training ends by either limit: a run cut short by ``--max_minutes`` still ends fully decayed.

    Args:
        optimizer: its groups' ``lr`` at construction are the base rates.
        warmup_steps: steps of linear warm-up from ``base_lr / warmup_steps``.
        power: exponent of the decay (nnU-Net's 0.9).
        max_minutes: the training budget, if any.
        min_factor: the rate never falls below ``min_factor * base_lr``.
        decay: ``"poly"``, or ``"step"`` for the paper's ``gamma ** (step // step_size)`` (by steps only).
        step_size: steps between two ``"step"`` decays.
        gamma: factor of each ``"step"`` decay.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 50,
        power: float = 0.9,
        max_minutes: float | None = None,
        min_factor: float = 0.01,
        decay: str = "poly",
        step_size: int = 2512,
        gamma: float = 0.75,
    ) -> None:
        if decay not in ("poly", "step"):
            raise ValueError(f"decay must be 'poly' or 'step', got {decay!r}")
        self.decay = decay
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_steps = max(int(warmup_steps), 0)
        self.power = float(power)
        self.clock = TimeLimit(max_minutes)  # only its clock: stopping is the run's own TimeLimit's job
        self.min_factor = float(min_factor)

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.clock.started)
        trainer.add_event_handler(Events.ITERATION_STARTED, self)

    def factor(self, step: int, total_steps: int) -> float:
        """The multiplier of the base rates at (0-based) ``step``."""
        if self.decay == "step":
            decay = self.gamma ** (step // self.step_size)
        else:
            progress = max(step / max(total_steps, 1), self.clock.elapsed_fraction())
            decay = max(1.0 - min(progress, 1.0), 0.0) ** self.power
        warmup = min((step + 1) / self.warmup_steps, 1.0) if self.warmup_steps else 1.0
        return max(warmup * decay, self.min_factor)

    def __call__(self, trainer: Engine) -> None:
        total = (trainer.state.max_epochs or 1) * (trainer.state.epoch_length or 1)
        factor = self.factor(trainer.state.iteration - 1, total)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor


class TrainingSummary:
    """Write ``{"steps", "epochs", "seconds", "stopped_by", "threads"}`` as JSON when training ends, for reports and
    studies (``threads``: PyTorch's CPU threads, which set how many steps a time budget buys).

    Args:
        path: the JSON file (written through a temporary name).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = 0.0

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.started)
        trainer.add_event_handler(Events.COMPLETED, self)

    def started(self, trainer: Engine) -> None:
        self.start = time.monotonic() - getattr(trainer.state, "resumed_seconds", 0.0)

    def __call__(self, trainer: Engine) -> None:
        out_of_time = getattr(trainer.state, "time_limit_reached", False)
        summary = {
            "steps": trainer.state.iteration,
            "epochs": trainer.state.epoch,
            "seconds": round(time.monotonic() - self.start, 1),
            "stopped_by": "max_minutes" if out_of_time else "max_epochs",
            "threads": torch.get_num_threads(),
        }
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(summary, self.path, indent=2)
