"""Rationale consistency rules: each rule passes a clean rationale and flags a contradiction."""

from __future__ import annotations

from radiag.cohort.schema import Label
from radiag.teacher.quality import (
    QualityReport,
    StatedFinding,
    argued_class,
    check_rationale,
    stated_findings,
)

GRADES = ("Hippocampus", "Entorhinal", "Fusiform", "MidTemp", "WholeBrain", "Ventricles")


def record(mmse=27.0, apoe4=1, **grades):
    """A patient record; every grade is No unless given."""
    row = {"MMSE": mmse, "APOE4": apoe4}
    row.update({f"grade_{region}": grades.get(region, "No") for region in GRADES})
    return row


def reasons(rationale, row=None, label=None):
    return check_rationale(rationale, row or record(), label).reasons


def assert_flags(rationale, fragment, row=None, label=None):
    found = reasons(rationale, row, label)
    assert any(fragment in reason for reason in found), found


AD_RECORD = record(mmse=20.0, apoe4=2, Hippocampus="Severe", Entorhinal="Mild", Ventricles="Severe")
AD_RATIONALE = """The patient has a Mini-mental State Examination score of 20/30, which indicates
moderate cognitive impairment. The patient carries two copies of the APOE4 gene, which greatly
increases the risk of Alzheimer's disease. The MRI shows severe hippocampal atrophy, mild atrophy
of the entorhinal cortex and enlarged ventricles, a pattern typical of Alzheimer's disease.
Taken together, these findings are consistent with Alzheimer's disease.
Final Diagnosis: (A) Alzheimer's Disease"""


def test_paper_style_consistent_rationale_is_not_flagged():
    report = check_rationale(AD_RATIONALE, AD_RECORD, "AD")
    assert report == QualityReport(flagged=False, reasons=())


def test_rationale_that_omits_facts_is_not_flagged():
    text = "The cognitive profile and imaging point to a neurodegenerative process. Final Diagnosis: (A) Alzheimer's Disease"
    assert not check_rationale(text, AD_RECORD, "AD").flagged


def test_null_record_values_skip_their_checks():
    text = "The MMSE is 12/30, the patient has two copies of APOE4 and severe hippocampal atrophy."
    row = {"MMSE": None, "APOE4": float("nan"), "grade_Hippocampus": None}
    assert check_rationale(text, row, None) == QualityReport(False, ())


# a. argued class


def test_final_diagnosis_line_is_the_argued_class():
    assert argued_class("... Final Diagnosis: (B) Mild Cognitive Impairment") == "MCI"
    assert not reasons("Final Diagnosis: (B) Mild Cognitive Impairment", label=Label.MCI)
    assert_flags(
        "Final Diagnosis: (A) Alzheimer's Disease",
        "argues for AD but the label is MCI",
        label="MCI",
    )


def test_last_conclusion_phrase_is_the_argued_class_without_a_final_line():
    text = "Hippocampal atrophy is suggestive of AD pathology, but overall the findings are consistent with mild cognitive impairment."
    assert argued_class(text) == "MCI"
    assert not reasons(text, label="MCI")
    assert_flags(
        "Therefore, the most likely diagnosis is Alzheimer's disease.",
        "argues for AD but the label is CN",
        label="CN",
    )
    assert_flags(
        "In conclusion, the patient is cognitively normal.",
        "argues for CN but the label is MCI",
        label="MCI",
    )


def test_negated_or_hedged_class_mentions_are_no_conclusion():
    assert argued_class("The findings are not consistent with Alzheimer's disease.") is None
    assert (
        argued_class("The picture suggests AD-related changes and a risk of progression.") is None
    )
    assert argued_class("A diagnosis of dementia is unlikely; the patient has MCI.") == "MCI"


def test_no_label_skips_the_argued_class_rule():
    assert not reasons("Final Diagnosis: (A) Alzheimer's Disease", label=None)


# b. class confusion


def test_mci_called_a_form_of_alzheimers_is_flagged():
    text = (
        "MCI is a mild form of Alzheimer's disease, and this patient shows it.\n"
        "Final Diagnosis: (B) Mild Cognitive Impairment"
    )
    report = check_rationale(text, record(), "MCI")
    assert report.flagged
    assert any("MCI is a form of Alzheimer's disease" in r for r in report.reasons)
    assert_flags("The patient has MCI, an early form of AD.", "form of Alzheimer's")
    assert_flags(
        "Mild cognitive impairment is essentially Alzheimer's disease.", "form of Alzheimer's"
    )


def test_correct_statements_about_mci_are_not_flagged():
    assert not reasons("MCI is not a form of Alzheimer's disease; it can precede AD.")
    assert not reasons("MCI is a syndrome that may progress to Alzheimer's disease.")
    assert not reasons("The patient has MCI due to Alzheimer's disease.")


# c. MMSE


def test_mmse_matching_the_record_is_not_flagged():
    assert not reasons("The MMSE score of 27.0/30 is within the normal range.", record(mmse=27.0))
    assert not reasons("The patient scored 27 out of 30 on the MMSE.", record(mmse=27.0))
    assert not reasons("An MMSE below 24 suggests impairment; the MMSE is 27.", record(mmse=27.0))


def test_mmse_differing_from_the_record_is_flagged():
    assert_flags(
        "The patient's MMSE score of 24/30 is low.",
        "states MMSE 24/30 but the record says 28/30",
        record(mmse=28.0),
    )
    assert_flags("Mini-Mental State Examination: 22", "states MMSE 22/30", record(mmse=28.0))
    assert_flags(
        "The patient scored 24/30 on the Mini-Mental State Examination.",
        "states MMSE 24/30",
        record(mmse=28.0),
    )


def test_mmse_thresholds_and_ranges_are_not_patient_values():
    text = (
        "An MMSE score of 24 or below indicates impairment, and scores between 20 and 24 are mild."
    )
    assert not reasons(text, record(mmse=28.0))
    assert not reasons("Patients with AD typically have an MMSE of 20/30.", record(mmse=28.0))


# d. APOE4


def test_apoe4_copies_matching_the_record_are_not_flagged():
    assert not reasons("The patient has one copy of the APOE4 gene.", record(apoe4=1))
    assert not reasons("The patient is a heterozygous APOE ε4 carrier (ε3/ε4).", record(apoe4=1))
    assert not reasons(
        "The patient is not an APOE4 carrier, which lowers the risk.", record(apoe4=0)
    )
    assert not reasons(
        "APOE4 carriers have a higher risk; this patient has no APOE4 gene.", record(apoe4=0)
    )


def test_apoe4_copies_differing_from_the_record_are_flagged():
    assert_flags(
        "The patient has two copies of APOE4.",
        'states "two copies of APOE4" but the record says one copy',
        record(apoe4=1),
    )
    assert_flags("The patient is homozygous for APOE4.", "record says no copies", record(apoe4=0))
    assert_flags("The patient is an APOE4 carrier.", "record says no copies", record(apoe4=0))
    assert_flags(
        "The patient does not carry the APOE4 allele.", "record says two copies", record(apoe4=2)
    )


def test_apoe4_negated_or_ranged_counts_are_not_claims():
    assert not reasons("The patient does not have two copies of APOE4.", record(apoe4=1))
    assert not reasons("Having one or two copies of APOE4 raises risk.", record(apoe4=0))


# e. MRI findings


def test_findings_matching_the_grades_are_not_flagged():
    row = record(Hippocampus="Mild", Ventricles="Severe")
    text = (
        "There is mild hippocampal atrophy and no evidence of entorhinal or fusiform atrophy. "
        "The ventricles are markedly enlarged, and there is no significant hippocampal atrophy."
    )
    assert not reasons(text, row)


def test_no_atrophy_claimed_against_a_mild_or_severe_grade_is_flagged():
    row = record(Hippocampus="Mild", Ventricles="Severe")
    assert_flags(
        "There is no evidence of hippocampal atrophy.",
        "claims no hippocampal atrophy but the grade is Mild",
        row,
    )
    assert_flags(
        "The ventricles are not enlarged.",
        "claims no ventricle enlargement but the grade is Severe",
        row,
    )
    assert_flags("Atrophy of hippocampus: No", "claims no hippocampal atrophy", row)


def test_severe_atrophy_claimed_against_a_no_grade_is_flagged():
    row = record(Hippocampus="No", WholeBrain="No", Entorhinal="Mild")
    assert_flags(
        "The MRI shows severe hippocampal atrophy.",
        "claims severe hippocampal atrophy but the grade is No",
        row,
    )
    assert_flags(
        "Marked atrophy of the hippocampus and cortex is seen.",
        "claims severe overall brain atrophy",
        row,
    )
    assert not reasons("There is severe entorhinal atrophy.", row)  # Mild vs severe: not opposite
    assert not reasons("There is mild hippocampal atrophy.", row)  # mild vs No: too close to call


def test_general_or_hypothetical_findings_are_not_claims():
    row = record(Hippocampus="No")
    assert not reasons("Severe hippocampal atrophy is typically seen in AD.", row)
    assert not reasons("If there were severe hippocampal atrophy, AD would be likely.", row)


def test_stated_findings_read_region_and_degree_of_every_claim_on_the_patient():
    text = (
        "There is mild hippocampal atrophy and no evidence of entorhinal or fusiform atrophy. "
        "The ventricles are markedly enlarged. Cortical atrophy is present. "
        "There is no significant middle temporal atrophy. "
        "Severe hippocampal atrophy is typically seen in AD."
    )
    assert stated_findings(text) == [
        StatedFinding("Hippocampus", "Mild"),
        StatedFinding("Entorhinal", "No"),
        StatedFinding("Fusiform", "No"),
        StatedFinding("Ventricles", "Severe"),
        StatedFinding("WholeBrain", "Stated"),
    ]  # a negated degree and a general clause claim nothing
