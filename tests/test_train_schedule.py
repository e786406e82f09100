"""A learning-rate schedule paced by a time limit (optim.fit_schedule_to_time): the Schedule on its own,
the config's check, and a run that the limit ends at min_lr."""

from __future__ import annotations

import json

import pytest
import torch
from train_utils import tiny_config

from gpt2lab.errors import GPT2LabError
from gpt2lab.train import train
from gpt2lab.train.config import OptimSection, load_train_config
from gpt2lab.train.optim import Schedule, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIM = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10)


def schedule(max_steps: int = 100) -> Schedule:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.0)
    return Schedule(opt, OPTIM, max_steps)


def run(s: Schedule, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(s.apply())
        s.advance()
    return rates


def test_the_schedule_keeps_pace_with_the_clock_where_it_is_ahead_of_the_steps():
    s, now = schedule(), [0.0]
    s.follow_clock(lambda: now[0])
    assert run(s, 3) == [lr_at(k, OPTIM, 100) for k in range(3)]  # the clock at 0: the steps set the pace
    now[0] = 0.5  # half the time gone after 3 steps: the schedule is at step 50 of 100
    assert s.apply() == lr_at(50, OPTIM, 100) and s.position == 50
    s.advance()
    now[0] = 0.2  # a clock behind the position never takes the schedule back
    assert s.apply() == lr_at(50, OPTIM, 100)
    s.advance()
    now[0] = 1.3  # past the limit: the end of the schedule, min_lr
    assert s.apply() == pytest.approx(0.1) and s.position == 100
    assert s.last_lr == pytest.approx(0.1) and s.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_without_a_clock_or_behind_the_steps_the_rates_are_the_steps_own():
    plain = run(schedule(), 30)
    assert plain == [lr_at(k, OPTIM, 100) for k in range(30)]
    paced = schedule()
    paced.follow_clock(lambda: 0.0)  # the steps are ahead of the clock throughout
    assert run(paced, 30) == plain
    assert paced.state_dict() == {"step": 30}  # the format of a schedule without a clock


def test_a_resumed_schedule_keeps_its_position_and_spreads_the_rest_over_the_new_limit():
    s, now = schedule(), [0.6]
    s.follow_clock(lambda: now[0])
    run(s, 5)  # 5 steps, the schedule at 60 of 100
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"step": 5, "position": 60.0}
    resumed = schedule()
    resumed.load_state_dict(state)
    assert resumed.apply() == lr_at(60, OPTIM, 100)  # no clock: it goes on from where it was
    resumed.follow_clock(lambda: 0.5)  # half of the new limit: half of the 40 steps left
    assert resumed.apply() == lr_at(80, OPTIM, 100)
    with pytest.raises(GPT2LabError, match="position must be a number >= 0, got -1"):
        resumed.load_state_dict({"step": 1, "position": -1})


def test_fitting_the_schedule_to_time_needs_a_time_limit():
    with pytest.raises(GPT2LabError, match=r"optim.fit_schedule_to_time must be false without a time limit"):
        load_train_config(None, ["optim.fit_schedule_to_time=true"])
    cfg = load_train_config(None, ["optim.fit_schedule_to_time=true", "train.max_minutes=1.5"])
    assert cfg.optim.fit_schedule_to_time


@pytest.fixture
def fake_clock(monkeypatch):
    """The loop's clock, advanced by one second at every reading."""
    import gpt2lab.train.loop as loop

    now = iter(range(10**9))
    monkeypatch.setattr(loop, "_clock", lambda: float(next(now)))


@pytest.mark.parametrize("fit", [True, False])
def test_a_run_that_the_time_limit_ends_is_at_min_lr_when_its_schedule_is_fitted(corpus, tmp_path, fake_clock, fit):
    # 5 min of the fake clock's seconds (a few per step): the limit ends the run long before its 1,000 steps.
    optim = {"fit_schedule_to_time": fit, "warmup_steps": 200}  # lr 3e-3 to 3e-4 (tiny_config)
    train_ = {"max_minutes": 5.0, "max_steps": 1000}
    cfg = tiny_config(corpus, tmp_path, optim=optim, train=train_, checkpoint={"every": 0})
    result = train(cfg, progress=False)
    assert result.interrupted and 20 < result.step < 200
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in records if r["kind"] == "train"]
    if fit:  # warm-up over a fifth of the time, then down to min_lr by the limit
        peak = rates.index(max(rates))
        assert 3 < peak < len(rates) - 3 and max(rates) == pytest.approx(3e-3, rel=0.1)
        assert rates[: peak + 1] == sorted(rates[: peak + 1]) and rates[peak:] == sorted(rates[peak:], reverse=True)
        assert rates[-1] == pytest.approx(3e-4, rel=0.05)
    else:  # the steps' own schedule, still warming up, far above min_lr, when the limit ends the run
        assert rates == [lr_at(k, cfg.optim, 1000) for k in range(len(rates))] and rates[-1] > 1e-3
