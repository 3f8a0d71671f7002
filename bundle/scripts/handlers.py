"""Ignite handlers of the paper's training protocol that MONAI lacks."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

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
