"""The LLM judge: prompts, score parsing, pairwise aggregation, agreement statistics.

The fake engine below stands in for a judge model only where the logic under test is
ours (row plumbing, both-orderings aggregation); the slow test runs the real vLLM engine
in a Ray actor, as the stage does.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score
from stubs import JsonEndpoint

from radiag.cohort.schema import Label
from radiag.evaluation.agreement import agreement, verbosity_bias
from radiag.evaluation.criteria import CRITERIA
from radiag.evaluation.judge import (
    Judge,
    JudgeConfig,
    compare_rationales,
    judge_rationales,
    pairwise_summary,
)
from radiag.evaluation.judge_engine import ActorEngine
from radiag.evaluation.judge_prompts import (
    RUBRICS,
    feedback_of,
    judge_messages,
    load_prompts,
    pairwise_messages,
    parse_choice,
    parse_score,
)
from radiag.teacher.engines import Completion, Messages, SamplingConfig, VllmEngineConfig
from radiag.teacher.prompts import ANSWERS, QUESTION

DESCRIPTION = (
    "This patient is a 74-year-old female who has completed 16 years of education. The patient "
    "has a Mini-mental State Examination score of 22/30. Also, based on their MRI scans:\n"
    "- Atrophy of hippocampus: Severe"
)
RATIONALE = "The MMSE of 22/30 and severe hippocampal atrophy point to dementia."


class FakeEngine:
    """BatchEngine protocol; answers with `answer(conversation)` and records every call."""

    backend = "fake"
    model = "fake-judge"

    def __init__(self, answer: Callable[[str], str | None]) -> None:
        self.answer = answer
        self.calls: list[dict] = []

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingConfig,
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> list[Completion]:
        self.calls.append(
            {"conversations": conversations, "prefix": answer_prefix, "choices": answer_choices}
        )
        out = []
        for conversation in conversations:
            text = self.answer(conversation[-1]["content"])
            error = "engine failed" if text is None else None
            out.append(Completion(text or "", "stop", 10, 5, 0.1, error))
        return out


def response_a(prompt: str) -> str:
    return prompt.split("###Response A:")[1].split("###Response B:")[0]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_has_a_five_level_rubric_in_its_prompt(criterion: str) -> None:
    rubric = RUBRICS[criterion]
    assert sorted(rubric.scores) == [1, 2, 3, 4, 5] and all(rubric.scores.values())
    system, user = judge_messages(criterion, DESCRIPTION, RATIONALE, "MCI")
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert DESCRIPTION in text and QUESTION in text and RATIONALE in text
    assert rubric.instruction in text
    for score, meaning in rubric.scores.items():
        assert f"Score {score}: {meaning}" in text
    assert "Final Diagnosis: (B) Mild Cognitive Impairment" in text  # the model's diagnosis
    assert "[RESULT] (an integer number between 1 and 5)" in text
    assert set(RUBRICS) == set(CRITERIA)


def test_pairwise_prompt_shows_both_rationales_in_the_given_order() -> None:
    _, user = pairwise_messages("specificity", DESCRIPTION, "first one", "second one", "AD", "CN")
    text = user["content"]
    assert DESCRIPTION in text and RUBRICS["specificity"].instruction in text
    assert text.index("first one") < text.index("###Response B:") < text.index("second one")
    assert "Final Diagnosis: (C) Normal Cognition" in text
    assert '[RESULT] (Either "A" or "B")' in text


def test_the_judge_is_never_told_the_true_label() -> None:
    """Builders take no label, and a label in the records never reaches any prompt."""
    for builder in (judge_messages, pairwise_messages):
        assert not any("label" in p for p in inspect.signature(builder).parameters)
    records = pd.DataFrame(
        {"patient_id": ["p1"], "description": [DESCRIPTION], "label": ["AD"], "DX": ["Dementia"]}
    )
    rows = pd.DataFrame(
        {"model": ["m1", "m2"], "patient_id": ["p1", "p1"], "rationale": [RATIONALE, "Normal."],
         "diagnosis": ["CN", "MCI"], "error": [None, None]}
    )  # fmt: skip
    engine = FakeEngine(lambda _: "Feedback: fine. [RESULT] 3")
    cfg = JudgeConfig()
    judge_rationales(cfg, rows, records, engine=engine)
    compare_rationales(cfg, rows, records, engine=engine)
    prompts = [c[-1]["content"] for call in engine.calls for c in call["conversations"]]
    assert len(prompts) == 2 * 5 + 2 * 5
    for prompt in prompts:
        # Every option appears in the question; the true label (AD) nowhere else.
        rest = prompt.replace(QUESTION, "")
        assert ANSWERS[Label.AD] not in rest and "Dementia" not in rest
        assert "correct diagnosis is" not in prompt.lower()


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("Feedback: The rationale is consistent. [RESULT] 4", 4),
        ("Feedback: ok\n[RESULT]5", 5),
        ("[RESULT]: 3", 3),
        ("Feedback: x **[RESULT]** 2", 2),
        ("[Result] 1/5", 1),
        ("[RESULT] (4)", 4),
        ("I give [RESULT] 2 ... after all, [RESULT] 5", 5),  # the last one counts
        ("[RESULT] 6", None),
        ("[RESULT] 0", None),
        ("[RESULT] 4.5", None),
        ("[RESULT] A", None),
        ("Score: 4", None),  # never guessed without the marker
        ("", None),
    ],
)
def test_parse_score(text: str, score: int | None) -> None:
    assert parse_score(text) == score


@pytest.mark.parametrize(
    ("text", "choice"),
    [("Feedback: A is vaguer. [RESULT] B", "B"), ("[RESULT] a", "A"), ("[RESULT] (A)", "A"),
     ("[RESULT] Alzheimer", None), ("[RESULT] 3", None), ("A", None)],
)  # fmt: skip
def test_parse_choice(text: str, choice: str | None) -> None:
    assert parse_choice(text) == choice


def test_feedback_is_the_text_before_the_result() -> None:
    assert feedback_of("Feedback: Cites the MMSE.\n[RESULT] 4") == "Cites the MMSE."
    assert feedback_of("no marker at all") == "no marker at all"


def test_grade_asks_for_a_constrained_score_per_criterion_and_keeps_failures() -> None:
    answers = iter(["Feedback: good. [RESULT] 5", "no score here", None])
    engine = FakeEngine(lambda _: next(answers))
    judge = Judge(JudgeConfig(criteria=["consistency", "specificity"]), engine=engine)
    items = [
        {"model": "m", "patient_id": "p1", "description": DESCRIPTION, "rationale": RATIONALE,
         "diagnosis": "AD"},
        {"model": "m", "patient_id": "p2", "description": DESCRIPTION, "rationale": RATIONALE,
         "diagnosis": "AD", "criterion": "helpfulness"},
        {"model": "m", "patient_id": "p3", "description": DESCRIPTION, "rationale": None,
         "diagnosis": None},
    ]  # fmt: skip
    rows = judge.grade(items)
    assert engine.calls[0]["prefix"] == "[RESULT]"
    assert engine.calls[0]["choices"] == ["1", "2", "3", "4", "5"]
    assert [(r["patient_id"], r["criterion"]) for r in rows] == [
        ("p1", "consistency"), ("p1", "specificity"), ("p2", "helpfulness"),
        ("p3", "consistency"), ("p3", "specificity"),
    ]  # fmt: skip
    assert rows[0]["score"] == 5 and rows[0]["feedback"] == "good." and rows[0]["error"] is None
    assert rows[1]["score"] is None and "[RESULT]" in rows[1]["parse_error"]
    assert rows[2]["score"] is None and rows[2]["error"] == "engine failed"
    assert rows[3]["error"] == "missing description or rationale"
    assert len(engine.calls[0]["conversations"]) == 3  # no call for the missing rationale
    assert {r["engine"] for r in rows} == {"fake"} and {r["model_judge"] for r in rows} == {
        "fake-judge"
    }
    assert {r["prompt_version"] for r in rows} == {"v1"}


def test_judge_rationales_is_a_long_table_limited_per_model() -> None:
    records = pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "description": [DESCRIPTION] * 3})
    rows = pd.DataFrame(
        {"model": ["t"] * 3 + ["s"] * 3, "patient_id": ["p3", "p1", "p2"] * 2,
         "rationale": ["r"] * 5 + [""], "diagnosis": ["AD"] * 6, "error": [None] * 6}
    )  # fmt: skip
    out = judge_rationales(
        JudgeConfig(limit=2), rows, records, engine=FakeEngine(lambda _: "[RESULT] 2")
    )
    assert list(out.columns[:5]) == ["model", "patient_id", "criterion", "score", "source"]
    assert (out["source"] == "judge").all() and str(out["score"].dtype) == "Int64"
    # The first two by patient_id with a rationale: s has none for p2, so p3 takes its place.
    assert sorted(out.groupby("model")["patient_id"].unique().map(list).items()) == [
        ("s", ["p1", "p3"]),
        ("t", ["p1", "p2"]),
    ]
    assert len(out) == 2 * 2 * len(CRITERIA) and (out["score"] == 2).all()


def _pairs(n: int) -> list[dict]:
    return [
        {"patient_id": f"p{i}", "criterion": "helpfulness", "description": DESCRIPTION,
         "model_a": "student", "rationale_a": f"plain {i}", "diagnosis_a": "MCI",
         "model_b": "teacher", "rationale_b": f"GOOD {i}", "diagnosis_b": "AD"}
        for i in range(n)
    ]  # fmt: skip


def test_compare_runs_both_orderings_and_a_consistent_preference_wins() -> None:
    """A judge that always prefers the GOOD rationale, wherever it is shown."""
    engine = FakeEngine(lambda p: "[RESULT] A" if "GOOD" in response_a(p) else "[RESULT] B")
    rows = Judge(JudgeConfig(), engine=engine).compare(_pairs(3))
    shown_first = [response_a(c[-1]["content"]) for c in engine.calls[0]["conversations"]]
    assert len(shown_first) == 6 and engine.calls[0]["choices"] == ["A", "B"]
    assert "plain 0" in shown_first[0] and "GOOD 0" in shown_first[1]  # (a, b), then (b, a)
    assert [(r["choice_ab"], r["choice_ba"], r["winner"], r["consistent"]) for r in rows] == [
        ("B", "A", "teacher", True)
    ] * 3
    summary = pairwise_summary(pd.DataFrame(rows)).iloc[0]
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (0, 3, 0)
    assert summary["position_consistency"] == 1.0 and summary["first_position_rate"] == 0.5


def test_a_position_biased_judge_yields_only_ties() -> None:
    engine = FakeEngine(lambda _: "Feedback: the first is better. [RESULT] A")
    rows = Judge(JudgeConfig(), engine=engine).compare(_pairs(4))
    assert {r["winner"] for r in rows} == {"tie"} and not any(r["consistent"] for r in rows)
    summary = pairwise_summary(pd.DataFrame(rows)).iloc[0]
    assert (summary["wins_a"], summary["wins_b"], summary["ties"]) == (0, 0, 4)
    assert summary["position_consistency"] == 0.0 and summary["first_position_rate"] == 1.0


def test_an_unparsed_or_failed_ordering_makes_a_tie() -> None:
    answers = iter(["[RESULT] B", "no choice", "[RESULT] B", None])
    rows = Judge(JudgeConfig(), engine=FakeEngine(lambda _: next(answers))).compare(_pairs(2))
    assert [r["winner"] for r in rows] == ["tie", "tie"]
    assert rows[0]["parse_error"] and rows[0]["error"] is None
    assert rows[1]["error"] == "engine failed" and rows[1]["choice_ba"] is None


def _scores(values: dict[str, list[float]], **extra: list) -> pd.DataFrame:
    rows = [
        {"model": "m", "patient_id": f"p{i}", "criterion": c, "score": s}
        for c, scores in values.items()
        for i, s in enumerate(scores)
    ]
    return pd.DataFrame(rows).assign(**extra) if extra else pd.DataFrame(rows)


def test_agreement_on_known_inputs() -> None:
    judge = _scores({"consistency": [1, 2, 3, 4, 5], "correctness": [1, 2, 3, 4]})
    other = _scores({"consistency": [1, 2, 3, 4, 5], "correctness": [2, 3, 4, 5]})
    out = agreement(judge, other).set_index("criterion")
    assert out.loc["consistency"].tolist() == pytest.approx([5, 1.0, 1.0, 1.0])
    shifted = out.loc["correctness"]
    assert shifted["n"] == 4 and shifted["spearman"] == pytest.approx(1.0)
    assert shifted["exact_agreement"] == 0.0
    expected = cohen_kappa_score([1, 2, 3, 4], [2, 3, 4, 5], labels=[1, 2, 3, 4, 5], weights="quadratic")  # fmt: skip
    assert shifted["kappa_quadratic"] == pytest.approx(expected) and expected < 1


def test_agreement_averages_raters_and_matches_keys() -> None:
    judge = _scores({"helpfulness": [2, 4, 5, None]})
    humans = pd.concat(
        [
            _scores({"helpfulness": [2, 3, 5, 1]}, rater=["r1"] * 4),
            _scores({"helpfulness": [2, 4, 4]}, rater=["r2"] * 3),  # mean 2, 3.5 -> 4, 4.5 -> 5
        ]
    )
    row = agreement(judge, humans).iloc[0]
    assert row["n"] == 3 and row["exact_agreement"] == 1.0 and row["kappa_quadratic"] == 1.0


def test_agreement_with_an_off_scale_metric_gives_spearman_only() -> None:
    row = agreement(_scores({"specificity": [1, 3, 5]}), _scores({"specificity": [0.1, 0.2, 0.9]}))
    assert row.iloc[0]["spearman"] == pytest.approx(1.0)
    assert np.isnan(row.iloc[0]["kappa_quadratic"]) and np.isnan(row.iloc[0]["exact_agreement"])


def test_verbosity_bias_correlates_mean_score_with_length() -> None:
    rationales = pd.DataFrame(
        {"model": "m", "patient_id": ["p0", "p1", "p2"], "rationale": ["a", "a b c", "a b c d e"]}
    )
    scores = _scores({"consistency": [1, 2, 5], "specificity": [1, 4, 5]})
    assert verbosity_bias(scores, rationales) == pytest.approx(1.0)
    flat = _scores({"consistency": [3, 3, 3]})
    assert np.isnan(verbosity_bias(flat, rationales))


def test_config_defaults_and_validation() -> None:
    cfg = JudgeConfig()
    assert tuple(cfg.criteria) == CRITERIA and cfg.sampling.temperature == 0
    assert cfg.engine.backend == "vllm" and not cfg.pairwise
    remote = JudgeConfig.model_validate(
        {"engine": {"backend": "openai", "base_url": "http://h/v1", "model": "prometheus"}}
    )
    assert remote.engine.backend == "openai"
    with pytest.raises(ValueError, match="each once"):
        JudgeConfig(criteria=["consistency", "consistency"])
    with pytest.raises(ValueError):
        JudgeConfig(criteria=["fluency"])


def test_prompt_texts_are_versioned_data_and_every_row_records_the_version() -> None:
    v1 = load_prompts("v1")
    assert v1.version == "v1" and v1.rubrics == RUBRICS
    system, user = judge_messages("specificity", DESCRIPTION, RATIONALE, "AD", version="v1")
    assert system["content"] == v1.absolute_system
    assert user["content"].endswith("###Feedback: ")  # the judge writes right after it
    assert pairwise_messages("specificity", DESCRIPTION, "a", "b")[1]["content"].endswith(
        "###Feedback: "
    )
    with pytest.raises(FileNotFoundError):
        load_prompts("v0")
    engine = FakeEngine(lambda _: "[RESULT] 3")
    rows = Judge(JudgeConfig(criteria=["consistency"]), engine).grade(
        [{"model": "m", "patient_id": "p1", "description": DESCRIPTION, "rationale": RATIONALE}]
    )
    assert rows[0]["prompt_version"] == "v1"


class StubEndpoint(JsonEndpoint):
    """An OpenAI-compatible chat endpoint that scores a prompt by its patient's number."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        patient = re.search(r"patient number (\d)", request["messages"][-1]["content"])[1]
        self.send_json(
            {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": f"Fine. [RESULT] {patient}"}}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip


@pytest.fixture
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_the_engine_lives_in_ray_actors_and_answers_come_back_in_order(
    endpoint: str, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas, batches of two: the driver builds no engine, and every answer is its own
    conversation's (the stub scores patient number n with n)."""
    from radiag.teacher.openai_engine import OpenAIEngine

    def not_in_the_driver(*_: object) -> None:
        raise AssertionError("the judge's engine was built in the driver")

    monkeypatch.setattr(OpenAIEngine, "__init__", not_in_the_driver)  # this process only
    cfg = JudgeConfig(
        engine={"backend": "openai", "base_url": endpoint, "model": "stub", "replicas": 2,
                "batch_size": 2, "max_retries": 0},
        criteria=["consistency"],
    )  # fmt: skip
    items = [
        {"model": "m", "patient_id": f"p{n}", "description": f"This is patient number {n}.",
         "rationale": RATIONALE, "diagnosis": "AD"}
        for n in (3, 1, 4, 1, 5, 2, 5)
    ]  # fmt: skip
    with ActorEngine(cfg.engine) as engine:
        rows = Judge(cfg, engine).grade(items)
    pids = {p["pid"] for p in engine.processes}
    assert len(pids) == 2 and os.getpid() not in pids
    assert [r["score"] for r in rows] == [3, 1, 4, 1, 5, 2, 5]
    assert {(r["engine"], r["model_judge"]) for r in rows} == {("openai", "stub")}


@pytest.mark.slow
def test_real_vllm_judge_runs_in_a_ray_actor_and_always_yields_a_score_and_a_choice(
    tiny_model: Path, ray_cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random model writes gibberish feedback, but structured output forces the verdict.

    The engine is built in an actor's process: building one in this (the driver's)
    process fails. Temperature 1 (seeded): at temperature 0 a random model ends its
    answer at once.
    """
    from radiag.teacher.vllm_engine import VllmEngine

    def not_in_the_driver(*_: object) -> None:
        raise AssertionError("the judge's engine was built in the driver")

    monkeypatch.setattr(VllmEngine, "__init__", not_in_the_driver)  # this process only
    cfg = JudgeConfig(
        engine=VllmEngineConfig(
            model={"path": str(tiny_model)}, max_model_len=1024, cpu_kv_cache_gib=1, batch_size=4
        ),
        sampling=SamplingConfig(temperature=1.0, max_tokens=16, seed=1),
    )
    records = pd.DataFrame({"patient_id": ["p1", "p2"], "description": [DESCRIPTION] * 2})
    rows = pd.DataFrame(
        {"model": ["teacher", "teacher", "student", "student"],
         "patient_id": ["p1", "p2", "p1", "p2"],
         "rationale": [RATIONALE, "Normal memory.", "Some atrophy.", "Scores are normal."],
         "diagnosis": ["AD", "CN", "MCI", "CN"]}
    )  # fmt: skip
    with ActorEngine(cfg.engine) as engine:
        assert os.getpid() not in {p["pid"] for p in engine.processes}
        scores = judge_rationales(cfg, rows, records, engine)
        one = cfg.model_copy(update={"criteria": ["helpfulness"]})
        pairs = compare_rationales(one, rows, records, engine)
    assert len(scores) == 4 * len(CRITERIA)  # 20 conversations: 5 batches of 4
    assert scores["error"].isna().all() and scores["parse_error"].isna().all()
    assert all(isinstance(s, int) and 1 <= s <= 5 for s in scores["score"].tolist())
    assert (scores["engine"] == "vllm").all() and (scores["model_judge"] == str(tiny_model)).all()
    assert len(pairs) == 2 and pairs["error"].isna().all()
    assert set(pairs["choice_ab"]) | set(pairs["choice_ba"]) <= {"A", "B"}
