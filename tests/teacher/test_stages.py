"""The teacher stages on Ray Data with a real vLLM engine (a tiny random model).

Slow: each stage starts a vLLM engine (~30 s on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from radiag.cohort.describe import DescribeConfig
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import StageConflict
from radiag.store import RunStore
from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
from radiag.teacher.exemplars import ExemplarConfig
from radiag.teacher.stages import DiagnoseConfig, RationalizeConfig, read_output, teacher_stage

pytestmark = pytest.mark.slow


def engine(tiny_model: Path, dtype: str = "float32") -> VllmEngineConfig:
    return VllmEngineConfig(
        model={"path": str(tiny_model)},
        max_model_len=1024,
        cpu_kv_cache_gib=1,
        batch_size=4,
        dtype=dtype,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, ray_cluster: None) -> RunStore:
    """A run with splits, where one train row lost its description and one is far too long.

    The tiny model is random: sampled at temperature 1 (seeded) it writes non-empty text.
    """
    store = RunStore(str(tmp_path_factory.mktemp("teacher-run")))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=40, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    train = store.read_table("splits/train.parquet").sort_by("patient_id")
    descriptions = train["description"].to_pylist()
    descriptions[0] = None
    descriptions[1] = "very long history " * 400
    index = train.schema.get_field_index("description")
    store.write_table(
        "splits/train.parquet", train.set_column(index, "description", pa.array(descriptions))
    )
    return store


def test_rationalize_writes_one_row_per_patient_with_provenance(
    run: RunStore, tiny_model: Path
) -> None:
    cfg = RationalizeConfig(
        engine=engine(tiny_model), sampling=SamplingConfig(temperature=1.0, max_tokens=24), limit=10
    )
    summary = teacher_stage("rationalize", cfg, run)
    out = read_output(run, "rationalize").to_pandas().set_index("patient_id")
    assert summary.counts["rows"] == 10 == len(out) and out.index.is_unique
    first = out[out["error"].isna()].sort_index().iloc[0]  # part files come in any order
    assert first["engine"] == "vllm" and first["model"] == str(tiny_model)
    assert first["dtype"] == "float32"
    assert first["prompt_version"] == "v1" and first["task"] == "rationalize"
    assert '"max_tokens":24' in first["sampling"] and first["seed"] >= 0
    assert first["completion_tokens"] > 0 and first["prompt_tokens"] > 0 and first["finish_reason"]
    assert first["label_shown"] in {"CN", "MCI", "AD"}
    generated = out[out["error"].isna()]
    assert len(generated) == 8
    # Structured output forces a final answer; one the label contradicts is flagged and retried.
    assert generated["diagnosis"].isin(["CN", "MCI", "AD"]).all()
    wrong = generated["diagnosis"] != generated["label_shown"]
    assert generated.loc[wrong, "qc_flagged"].astype(bool).all()
    assert (generated.loc[wrong, "attempts"] == 2).all()
    # A retry samples at regeneration_temperature with a seed of its own, so it can differ.
    retried = generated[generated["attempts"] == 2]
    assert len(retried) and retried["sampling"].str.contains('"temperature":0.7').all()
    assert (retried["seed"] == 1).all()
    assert (
        generated.loc[generated["attempts"] == 1, "sampling"]
        .str.contains('"temperature":1.0')
        .all()
    )
    assert all(
        any("differs from the label" in r for r in reasons)
        for reasons in generated.loc[wrong, "qc_reasons"]
    )


def test_bad_rows_get_an_error_and_the_batch_completes(run: RunStore) -> None:
    out = read_output(run, "rationalize").to_pandas().sort_values("patient_id")
    errors = out["error"].dropna().tolist()
    assert "missing description" in errors
    assert any("max_model_len" in e for e in errors)


def test_a_rerun_skips_every_finished_patient(run: RunStore, tiny_model: Path) -> None:
    cfg = RationalizeConfig(
        engine=engine(tiny_model), sampling=SamplingConfig(temperature=1.0, max_tokens=24), limit=10
    )
    before = sorted(p.name for p in Path(run.path("rationales")).iterdir())
    summary = teacher_stage("rationalize", cfg, run)
    counts = summary.counts
    assert (counts["generated_now"], counts["skipped_done"], counts["rows"]) == (0, 10, 10)
    assert sorted(p.name for p in Path(run.path("rationales")).iterdir()) == before


def test_another_sampling_is_refused_and_appends_nothing(run: RunStore, tiny_model: Path) -> None:
    """The old main appended rows of the new sampling to the same table."""
    cfg = RationalizeConfig(
        engine=engine(tiny_model), sampling=SamplingConfig(temperature=0.5, max_tokens=24), limit=10
    )
    before = read_output(run, "rationalize")
    with pytest.raises(StageConflict, match=r"changed: config\.sampling\.temperature\..*--fresh"):
        teacher_stage("rationalize", cfg, run)
    assert read_output(run, "rationalize").equals(before)


def test_a_machine_resolving_another_precision_is_refused_with_the_remedy(
    run: RunStore, tiny_model: Path
) -> None:
    """The rows above ran in float32; the same stage resolved to bfloat16 (another machine)
    must not add bf16 rows to them."""
    cfg = RationalizeConfig(
        engine=engine(tiny_model, dtype="bfloat16"),
        sampling=SamplingConfig(temperature=1.0, max_tokens=24),
        limit=10,
    )
    remedy = (
        r"engine\.dtype: float32 in the run, bfloat16 on this machine.*set engine\.dtype: float32"
    )
    with pytest.raises(StageConflict, match=remedy):
        teacher_stage("rationalize", cfg, run)


def test_diagnose_uses_train_exemplars_and_always_yields_an_answer(
    run: RunStore, tiny_model: Path
) -> None:
    cfg = DiagnoseConfig(
        engine=engine(tiny_model),
        sampling=SamplingConfig(temperature=1.0, max_tokens=16),
        exemplars=ExemplarConfig(k=2, strategy="similar", exclude_flagged=False),
        limit=6,
    )
    summary = teacher_stage("diagnose", cfg, run)
    out = read_output(run, "diagnose")
    assert summary.counts["rows"] == 6 == out.num_rows
    train_ids = set(run.read_table("splits/train.parquet")["patient_id"].to_pylist())
    for exemplars in out["exemplar_ids"].to_pylist():
        assert len(exemplars) == 2 and set(exemplars) <= train_ids
    # Structured output (choice) forces a well-formed final line even from a random model.
    assert pc.all(pc.is_valid(out["diagnosis"])).as_py()
    assert set(out["diagnosis"].to_pylist()) <= {"CN", "MCI", "AD"}
    test_ids = set(run.read_table("splits/test.parquet")["patient_id"].to_pylist())
    assert set(out["patient_id"].to_pylist()) <= test_ids
