"""The ingress's adaptive in-flight limit: requests that would only time out are refused
at once (the served app under load: tests/serving/test_scaling.py)."""

from __future__ import annotations

import pytest

from radiag.serving.admission import AdmissionLimit

pytestmark = pytest.mark.reliability


def test_missed_deadlines_halve_the_limit_so_the_excess_is_refused_at_once() -> None:
    limit = AdmissionLimit(ceiling=32)
    assert all(limit.try_admit() for _ in range(32))
    assert not limit.try_admit()  # the ceiling
    for _ in range(32):  # a model slower than the timeout: every one of them is late
        limit.finished(seconds=30.0, outcome="late")
    assert limit.in_flight == 0 and limit.limit == 1
    assert limit.try_admit() and not limit.try_admit()  # one at a time, the rest refused


def test_answers_in_time_raise_the_limit_back_one_by_one() -> None:
    limit = AdmissionLimit(ceiling=4)
    limit.limit = 1.0
    for expected in (2, 3, 4, 4):
        assert limit.try_admit()
        limit.finished(seconds=0.5, outcome="answered")
        assert limit.limit == expected


def test_a_failure_releases_its_slot_without_judging_the_models_speed() -> None:
    limit = AdmissionLimit(ceiling=8)
    assert limit.try_admit()
    limit.finished(seconds=0.01, outcome="failed")
    assert (limit.in_flight, limit.limit, limit.seconds_per_answer) == (0, 8, 1.0)


def test_retry_after_is_about_one_answers_time() -> None:
    limit = AdmissionLimit(ceiling=8)
    for _ in range(40):
        assert limit.try_admit()
        limit.finished(seconds=6.2, outcome="answered")
    assert limit.retry_after_s == 7
