from types import SimpleNamespace

from ignite.engine import Engine

from scripts.handlers import MinimumMetricStopper, ValidateAtEnd


def _trainer(epochs: int, iterations_per_epoch: int = 2) -> Engine:
    trainer = Engine(lambda engine, batch: None)
    trainer.state.max_epochs = epochs
    return trainer, [0] * iterations_per_epoch


def test_minimum_metric_stopper_stops_a_hopeless_instance_after_the_grace_epochs():
    validator = SimpleNamespace(state=SimpleNamespace(best_metric=0.2))
    trainer, data = _trainer(epochs=20)
    MinimumMetricStopper(validator, threshold=0.3, epochs=10).attach(trainer)
    trainer.run(data, max_epochs=20)
    assert trainer.state.epoch == 10


def test_minimum_metric_stopper_lets_a_good_instance_run():
    validator = SimpleNamespace(state=SimpleNamespace(best_metric=0.35))
    trainer, data = _trainer(epochs=12)
    MinimumMetricStopper(validator, threshold=0.3, epochs=10).attach(trainer)
    trainer.run(data, max_epochs=12)
    assert trainer.state.epoch == 12


class _CountingValidator:
    def __init__(self):
        self.runs = 0

    def run(self, epoch):
        self.runs += 1


def test_validate_at_end_only_when_the_last_step_was_not_validated():
    for iterations, interval, expected in [(6, 4, 1), (8, 4, 0)]:
        validator = _CountingValidator()
        trainer = Engine(lambda engine, batch: None)
        ValidateAtEnd(validator, interval).attach(trainer)
        trainer.run([0] * iterations, max_epochs=1)
        assert validator.runs == expected
