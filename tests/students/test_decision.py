"""How a constrained student turns its three probabilities into a diagnosis."""

from __future__ import annotations

import pytest
import torch

from radiag.students.predict import NoTrainingMixError, decide, training_prior

# Option order is Label's: AD, MCI, CN.
QC_SKEWED = {"AD": 68, "MCI": 34, "CN": 85}  # the CPU preset's QC-passed training rows


def test_the_training_prior_is_each_class_share_of_the_rows_add_one_smoothed() -> None:
    prior = training_prior({"label_counts": QC_SKEWED}, "student")

    assert prior.tolist() == pytest.approx([69 / 190, 35 / 190, 86 / 190])
    # A class the rows lacked gets a small share, not zero: nothing divides by zero.
    assert training_prior({"label_counts": {"AD": 5, "MCI": 0, "CN": 5}}, "s")[1] == 1 / 13


def test_the_balanced_decision_divides_out_the_training_mix() -> None:
    prior = training_prior({"label_counts": QC_SKEWED}, "student")
    # Most probable is CN, but relative to how often each class was trained on, MCI
    # stands out: 0.30 / 0.18 > 0.45 / 0.45.
    probabilities = torch.tensor([0.25, 0.30, 0.45])

    assert decide(probabilities, None) == 2  # most_probable: CN
    assert decide(probabilities, prior) == 1  # balanced: MCI


def test_a_balanced_mix_decides_like_the_most_probable_option() -> None:
    prior = training_prior({"label_counts": {"AD": 10, "MCI": 10, "CN": 10}}, "student")
    for probabilities in torch.rand(20, 3).softmax(dim=1):
        assert decide(probabilities, prior) == decide(probabilities, None)


def test_an_export_without_its_training_mix_is_refused_with_the_way_out() -> None:
    with pytest.raises(
        NoTrainingMixError, match=r"checkpoints/text/final.*decision: most_probable"
    ):
        training_prior({"kind": "text"}, "checkpoints/text/final")
