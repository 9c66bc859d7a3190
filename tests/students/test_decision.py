"""How a constrained student turns its three probabilities into a diagnosis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radiag.students.predict import NoTrainingMixError, decide, fit_offsets, training_prior

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


def test_a_student_trained_with_balanced_classes_has_an_even_prior() -> None:
    """Its loss already weighed each diagnosis alike, so there is no mix to divide out."""
    info = {"label_counts": QC_SKEWED, "config": {"balance_classes": True}}
    assert training_prior(info, "student").tolist() == pytest.approx([1 / 3] * 3)


def test_an_export_without_its_training_mix_is_refused_with_the_way_out() -> None:
    with pytest.raises(
        NoTrainingMixError, match=r"checkpoints/text/final.*decision: most_probable"
    ):
        training_prior({"kind": "text"}, "checkpoints/text/final")


def test_validation_offsets_bring_back_a_class_the_argmax_never_answers() -> None:
    # Every row's most probable option is CN, yet the AD rows rank AD higher than the others.
    probabilities = np.array([[0.30, 0.10, 0.60]] * 3 + [[0.10, 0.10, 0.80]] * 3)
    labels = ["AD"] * 3 + ["CN"] * 3

    offsets, accuracy = fit_offsets(probabilities, labels)

    assert accuracy == 1.0  # the two present classes' recalls
    assert offsets["CN"] == 0.0 and offsets["MCI"] == 0.0  # nothing to gain from moving MCI
    # Smallest on the grid that lifts AD over CN on the AD rows but not on the CN rows:
    # log(0.6/0.3) = 0.69 < offset < log(0.8/0.1) = 2.08.
    assert offsets["AD"] == pytest.approx(0.7)
    scores = np.log(probabilities) + np.array([offsets["AD"], offsets["MCI"], offsets["CN"]])
    assert [("AD", "MCI", "CN")[i] for i in scores.argmax(axis=1)] == labels


def test_of_equally_good_offsets_the_plain_argmax_wins() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])

    assert fit_offsets(probabilities, ["AD", "MCI", "CN"]) == (
        {"AD": 0.0, "MCI": 0.0, "CN": 0.0},
        1.0,
    )
