import json
import time
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine

from scripts.handlers import MinimumMetricStopper, ValidateAtEnd, WeightAverage


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


def test_time_limit_stops_after_the_budget_and_summary_says_so(tmp_path, monkeypatch):
    from scripts import handlers

    clock = iter(range(0, 10**6, 30))  # every call to the clock moves 30 s on
    monkeypatch.setattr(handlers.time, "monotonic", lambda: float(next(clock)))
    trainer, data = _trainer(epochs=100)
    limit = handlers.TimeLimit(max_minutes=2)
    limit.attach(trainer)
    handlers.TrainingSummary(str(tmp_path / "out" / "summary.json")).attach(trainer)
    trainer.run(data, max_epochs=100)
    assert 1 < trainer.state.iteration < 10
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == trainer.state.iteration and summary["stopped_by"] == "max_minutes"
    assert summary["threads"] == torch.get_num_threads()


def test_time_limit_none_never_stops():
    from scripts.handlers import TimeLimit

    trainer, data = _trainer(epochs=3)
    TimeLimit(max_minutes=None).attach(trainer)
    trainer.run(data, max_epochs=3)
    assert trainer.state.iteration == 6


def test_warmup_poly_rises_then_decays_to_zero_by_steps_or_by_time():
    from scripts.handlers import WarmupPolyLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = WarmupPolyLR(optimizer, warmup_steps=10, power=0.9, min_factor=0.0)
    factors = [schedule.factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1 * (1.0) ** 0.9) and factors[9] > factors[0]
    assert max(factors) == factors[9] and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    timed = WarmupPolyLR(optimizer, warmup_steps=0, power=1.0, max_minutes=1.0, min_factor=0.0)
    timed.clock.start = time.monotonic() - 45.0  # three quarters of the budget spent
    assert timed.factor(step=1, total_steps=1000) == pytest.approx(0.25, abs=0.01)
    trainer, data = _trainer(epochs=1, iterations_per_epoch=4)
    WarmupPolyLR(optimizer, warmup_steps=0, power=1.0, min_factor=0.0).attach(trainer)
    trainer.run(data, max_epochs=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)  # set before the 4th of 4 steps


def test_step_decay_is_the_papers():
    from scripts.handlers import WarmupPolyLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = WarmupPolyLR(optimizer, warmup_steps=0, decay="step", step_size=2512, gamma=0.75, min_factor=0.0)
    assert [schedule.factor(s, 10) for s in (0, 2511, 2512, 5024)] == [1.0, 1.0, 0.75, 0.75**2]
    with pytest.raises(ValueError, match="decay must be"):
        WarmupPolyLR(optimizer, decay="cosine")


def test_weight_average_follows_the_trained_weights_with_its_warm_up():
    """Each step moves the average a (1 - d) share towards the trained weights, d = min(decay, (1 + t) / (10 + t));
    batch-norm statistics are averaged, the batch counter copied."""
    network = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = WeightAverage(network, WeightAverage.averaged_copy(network, 0.9), decay=0.9)
    start = average.averaged[0].weight.clone()
    updates = []

    def step(engine, batch):  # a training step: the weights move by a known amount
        with torch.no_grad():
            network[0].weight.add_(1.0)
            network[1].running_mean.add_(1.0)
            network[1].num_batches_tracked.add_(1)
        updates.append(network[0].weight.clone())

    trainer = Engine(step)
    average.attach(trainer)
    trainer.run([0] * 30, max_epochs=1)
    expected = start
    for t, trained in enumerate(updates, start=1):
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * trained
    torch.testing.assert_close(average.averaged[0].weight, expected)
    assert not torch.allclose(average.averaged[0].weight, network[0].weight)  # it lags the trained weights
    assert 0 < float(average.averaged[1].running_mean[0]) < 30  # averaged, not copied (the trained value is 30)
    assert int(average.averaged[1].num_batches_tracked) == 30
    assert not any(p.requires_grad for p in average.averaged.parameters())


def test_weight_average_off_is_the_trained_network_itself():
    network = torch.nn.Linear(3, 2)
    assert WeightAverage.averaged_copy(network, None) is network
    with pytest.raises(ValueError, match="weight_average_decay must be in"):
        WeightAverage.averaged_copy(network, 1.0)


def test_weight_average_off_accepts_a_data_parallel_network(tmp_path):
    """Off, the averaged network is the DDP wrapper itself, whose names carry a ``module.`` prefix."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        network = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        average = WeightAverage(network, WeightAverage.averaged_copy(network, None), decay=None)
        assert average.averaged is network
        wrapped_on = WeightAverage(network, WeightAverage.averaged_copy(network, 0.9), decay=0.9)
        assert wrapped_on.averaged is not network and len(wrapped_on.averaged.state_dict()) == 2
    finally:
        torch.distributed.destroy_process_group()
