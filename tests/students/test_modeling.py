"""The student model: the MRI prefix lines up with the tokens whatever the padding side."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from radiag.students.formatting import IGNORE
from radiag.students.modeling import (
    MriPrefix,
    StudentModel,
    StudentWeightsError,
    build_encoder,
    load_trainable,
    trainable_state,
)

SPATIAL = (32, 32, 32)


@pytest.fixture(scope="module")
def lm(tiny_model: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def vlm(lm) -> StudentModel:
    torch.manual_seed(0)
    encoder = build_encoder("densenet_small", 16, SPATIAL)
    return StudentModel(lm, MriPrefix(encoder, 16, lm.config.hidden_size, 4), 0).eval()


@pytest.mark.parametrize("name", ["densenet_small", "vit_small"])
def test_each_encoder_maps_a_volume_to_one_feature_vector(name: str) -> None:
    encoder = build_encoder(name, 24, SPATIAL)
    assert encoder(torch.randn(2, 1, *SPATIAL)).shape == (2, 24)


def test_the_volume_becomes_prefix_embeddings_in_front_of_the_tokens(lm) -> None:
    model = vlm(lm)
    inputs, mask = model.embed([[5, 6, 7], [8, 9]], torch.randn(2, 1, *SPATIAL))
    assert inputs.shape == (2, 4 + 3, lm.config.hidden_size)
    assert mask.tolist() == [[1] * 7, [1] * 6 + [0]]


def test_left_padding_puts_padding_before_the_prefix(lm) -> None:
    model = vlm(lm)
    volumes = torch.randn(2, 1, *SPATIAL)
    right, _ = model.embed([[5, 6, 7], [8, 9]], volumes)
    left, mask = model.embed([[5, 6, 7], [8, 9]], volumes, pad_left=True)
    assert mask.tolist() == [[1] * 7, [0] + [1] * 6]
    assert torch.allclose(left[1, 1:], right[1, :6])  # same prefix + tokens, shifted by the pad


def test_the_loss_ignores_prompt_and_padding_and_does_not_depend_on_the_batch(lm) -> None:
    model = StudentModel(lm, None, pad_token_id=0)
    ids = [[5, 6, 7, 8], [9, 10]]
    labels = [[IGNORE, IGNORE, 7, 8], [IGNORE, 10]]
    with torch.no_grad():
        nll = model(ids, labels)
        alone = model(ids[1:], labels[1:])
    assert nll.shape == (2, 4)
    assert (nll[0, :2] == 0).all() and (nll[0, 2:] > 0).all()  # prompt positions: no loss
    assert nll[1, 0] == 0 and (nll[1, 2:] == 0).all()  # prompt and padding: no loss
    assert torch.allclose(nll[1, :2], alone[0], atol=1e-5)


def test_the_loss_of_a_token_is_its_negative_log_likelihood(lm) -> None:
    model = StudentModel(lm, None, pad_token_id=0)
    with torch.no_grad():
        nll = model([[5, 6, 7]], [[IGNORE, IGNORE, 7]])
        logits = lm(torch.tensor([[5, 6, 7]])).logits
    expected = -torch.log_softmax(logits[0, 1].float(), dim=-1)[7]
    assert torch.allclose(nll[0, 2], expected, atol=1e-4)


def test_a_training_forward_keeps_no_key_value_cache(lm) -> None:
    """A cache is for generation: in training it is work thrown away, and under
    torch.compile each decoder layer's own cache slot made every layer a recompile."""
    model = StudentModel(lm, None, pad_token_id=0)
    calls: list[dict] = []
    hook = lm.register_forward_hook(
        lambda _, args, kwargs, out: calls.append(kwargs), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model([[5, 6, 7]], [[IGNORE, IGNORE, 7]])
    finally:
        hook.remove()
    assert [call.get("use_cache") for call in calls] == [False]


def test_the_loss_does_not_depend_on_the_default_dtype_another_thread_set(lm) -> None:
    """A served student scores requests while a hot swap loads the next one, and loading
    sets torch's process-wide default dtype (to bfloat16 for a bf16 student)."""
    model = StudentModel(lm, None, pad_token_id=0)
    with torch.no_grad():
        expected = model([[5, 6, 7]], [[IGNORE, IGNORE, 7]])
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            during = model([[5, 6, 7]], [[IGNORE, IGNORE, 7]])
        finally:
            torch.set_default_dtype(before)
    assert during.dtype == torch.float32 and torch.equal(during, expected)


def test_the_mri_side_trains_from_the_text_loss(lm) -> None:
    model = vlm(lm).train()
    model([[5, 6, 7]], [[IGNORE, 6, 7]], torch.randn(1, 1, *SPATIAL)).sum().backward()
    assert model.mri is not None
    grads = [p.grad for p in model.mri.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_trainable_weights_load_back_exactly(lm) -> None:
    model = vlm(copy.deepcopy(lm))  # the module's `lm` stays untouched
    state = {name: torch.zeros_like(value) for name, value in trainable_state(model).items()}
    load_trainable(model, state)
    assert all((p == 0).all() for p in model.parameters() if p.requires_grad)


def test_loading_weights_with_a_missing_key_names_it(lm) -> None:
    model = vlm(lm)
    state = trainable_state(model)
    dropped = next(iter(state))
    del state[dropped]
    with pytest.raises(StudentWeightsError, match=f"missing keys \\['{dropped}'\\]"):
        load_trainable(model, state)


def test_loading_weights_with_a_foreign_key_names_it(lm) -> None:
    model = vlm(lm)
    state = trainable_state(model) | {"lm.lora_B.stray.weight": torch.zeros(1)}
    with pytest.raises(StudentWeightsError, match=r"unexpected keys \['lm.lora_B.stray.weight'\]"):
        load_trainable(model, state)


@pytest.mark.parametrize("with_mri", [False, True], ids=["text", "mri+text"])
@pytest.mark.parametrize(
    "options",
    [[[20, 21, 22], [23], [24, 25]], [[20], [23], [24]]],  # as the answers are; one token each
    ids=["different-lengths", "single-tokens"],
)
def test_options_scored_after_one_prefix_pass_match_each_whole_sequence_scored(
    lm, with_mri: bool, options: list[list[int]]
) -> None:
    model = vlm(lm) if with_mri else StudentModel(lm, None, pad_token_id=0)
    prefixes = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    volumes = torch.randn(3, 1, *SPATIAL) if with_mri else None
    with torch.no_grad():
        scored = model.option_nll(prefixes, options, volumes)
        whole = torch.tensor(
            [
                [
                    model(
                        [prefix + option],
                        [[IGNORE] * len(prefix) + option],
                        volumes[i : i + 1] if volumes is not None else None,
                    ).sum()
                    for option in options
                ]
                for i, prefix in enumerate(prefixes)
            ]
        )
    assert scored.shape == (3, 3)
    assert torch.allclose(scored, whole, atol=1e-4)
