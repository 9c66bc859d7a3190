"""Rule-based consistency checks of a rationale against its patient record and label.

Weak teachers contradict the data they were shown. `check_rationale` flags only clear
contradictions, never omissions: a rationale silent on a fact passes, and a null (or
NaN) record value skips its rule. Evaluation reuses these rules as the automatic
"consistency" criterion. Text is split into sentences (. ! ? or newline). Rules c-e
skip a claim in a hypothetical sentence (if, unless, whether, would, could, might) or
in a general clause (clauses split at , ; ( ) but however while whereas although
though which who that) that says typically/usually/often/expected/such as/e.g./
patients/people/individuals/carriers/those/hallmark/unlike/rather than/instead of.

a. Argued class: the last "Final Diagnosis: (A|B|C) ..." line (`parse_answer`; A=AD,
   B=MCI, C=CN); without one, the last conclusion: a cue (consistent with, indicative
   of, suggests, indicates, supports, points to, diagnosis of/is, diagnosed with, the
   patient is/has, most likely, ...) then, after fillers ("a diagnosis of"), a class
   name: Alzheimer's disease/AD/dementia, mild cognitive impairment/MCI, normal
   cognition/cognitively normal/CN. Not a conclusion: a negation (not, no, against,
   enough, rather than, rule out ...) earlier in the cue's clause, a hedge (if, might,
   could, would be ...) in its sentence, or a name followed by pathology, risk,
   -related, "is unlikely", "is not"... Flagged when it differs from the label.
b. Class confusion: "MCI is a (mild|early ...) form/type/kind/variant of AD or
   dementia" (also "MCI, a ...", "MCI (a ...", "MCI, which is a ..."), "MCI is
   (essentially) (mild) Alzheimer's", "mild AD (MCI)", "mild AD, also known as MCI".
   Always flagged, whatever the label: MCI is a syndrome, not a form of AD.
c. MMSE: after "MMSE"/"Mini-Mental State Examination", the first number within 40
   characters of its sentence, if written N/30 or "N out of 30" or directly ("MMSE 24",
   "MMSE score of 24", "MMSE: 24"); or "N/30 on the MMSE". Skipped after a comparator
   (below, above, less, than, cut-off, threshold, between, from ...) or before a range
   ("or below", "24-26", "to 26") or "points". Flagged when |N - record| > 0.5.
d. APOE4 (APOE4, APOE ε4/e4, ε4): "no/zero/one/single/two/both (copies|alleles of)
   APOE4" = 0/1/2; homozygous = 2, heterozygous = 1; genotype ε3/ε4 = number of 4s;
   "APOE4 negative/non-carrier", "absence of/lacks/without APOE4" = 0; "APOE4
   carrier/positive", "carries APOE4" = at least 1, and 0 when negated ("not an APOE4
   carrier"). A negated count ("not two copies") or a range ("one or two") claims
   nothing. Flagged when the record count does not satisfy the claim.
e. MRI findings: hippocampus, entorhinal, fusiform, middle temporal, whole brain
   (whole-brain, global, overall, generalised, diffuse, cerebral, cortical, brain) with
   atrophy words (atrophy, atrophic, volume loss, shrinkage); ventricles with
   enlargement words (enlargement, enlarged, dilation, widening, ventriculomegaly).
   Forms: "Q hippocampal and entorhinal atrophy", "Q atrophy of the hippocampus",
   "Q enlarged ventricles", "hippocampal atrophy is/: Q", "the ventricles are (not|
   severely) enlarged". A negation alone (no, without, absence of, lack of, free of,
   does not show, no evidence of, absent, not seen, "No") claims No; a severity word
   (severe, significant, marked, pronounced, substantial, extensive, advanced,
   profound, prominent) claims Severe; a negated degree ("no significant atrophy")
   claims nothing; a mild/moderate word claims Mild, no degree word a bare finding, and
   neither is flagged. Flagged: No against Mild/Severe; Severe against No.
   `stated_findings` is this grammar as a public API: evaluation's specificity reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from radiag.teacher.parsing import parse_answer

_I = re.IGNORECASE
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE = re.compile(r"[,;()]|\b(?:but|however|while|whereas|although|though|which|who|that)\b", _I)
_HYPOTHETICAL = re.compile(r"\b(?:if|unless|whether|might|could|would)\b", _I)  # rules c-e
_HEDGE = re.compile(
    r"\b(?:if|unless|whether|might|could|would\s+(?:be|have|suggest|indicate))\b", _I
)
_GENERIC = re.compile(
    r"\b(?:typical(?:ly)?|usually|generally|in\s+general|often|commonly|tends?|expected|such\s+as|"
    r"e\.g|for\s+example|patients|people|individuals|carriers|those|hallmark|risk\s+factor|unlike|"
    r"in\s+contrast|instead\s+of|rather\s+than)\b",
    _I,
)
_AD = r"(?>alzheimer[’']?s(?:\s+disease)?(?:\s*\(AD\))?|(?-i:AD)\b)"
_MCI = r"(?>mild\s+cognitive\s+impairment(?:\s*\(MCI\))?|(?-i:MCI)\b)"
_CN = r"(?>normal\s+cognition|cognitively\s+(?:normal|healthy|unimpaired|intact)|(?-i:CN|NC)\b)"

# a. argued class: cue, filler, class name, and no hedge right after the name
_CONCLUSION = re.compile(
    r"(?:(?:consistent|compatible)\s+with|in\s+keeping\s+with|(?:indicative|suggestive)\s+of|"
    r"suggest(?:s|ing)?|indicat(?:es|ing)|point(?:s|ing)?\s+(?:to|towards?)|support(?:s|ing)?|"
    r"(?<!differential\s)diagnos(?:is|ed)\s+(?:of|is|as|with)|diagnos(?:e|ing)\s+(?:\w+\s+){0,2}?(?:with|as)|"
    r"(?:patient|individual|subject)\s+(?:is|has|appears\s+to\s+(?:be|have)|seems\s+to\s+(?:be|have))|"
    r"most\s+likely|conclu(?:de|sion)\s+(?:is\s+)?that|classif(?:y|ied)\s+(?:\w+\s+){0,2}?as)"
    r"\s+(?:(?:that\s+)?(?:the\s+)?patient\s+(?:has|is)\s+)?(?:(?:most\s+)?likely\s+|probably\s+)?(?:has\s+)?"
    r"(?:(?:a|an|the)\s+)?(?:(?:final|likely|probable|clinical)\s+)?(?:diagnosis\s+(?:of|is)\s+)?(?:(?:a|an)\s+)?"
    rf"(?:(?P<AD>{_AD}|dementia)|(?P<MCI>{_MCI})|(?P<CN>{_CN}))"
    r"(?![-\s]*(?:pathology|risk|progression|related|biomarkers?|changes|process|spectrum|continuum|type|"
    r"like|signature|pattern|features?|(?:is|are|seems|appears)?\s*(?:unlikely|less\s+likely)|"
    r"(?:is|are|was|can\s+be)\s+(?:not\b|ruled\s+out|excluded)))",
    _I,
)
_NEGATED_CUE = re.compile(  # anywhere in the clause before the cue
    r"(?:\b(?:not|no|never|less|hardly|against|enough|rather\s+than|instead\s+of|rul(?:e[sd]?|ing)\s+out)|n't)\b",
    _I,
)

# b. class confusion
_CONFUSION = re.compile(
    rf"{_MCI}\s*(?:,\s*(?:(?:which|that)\s+(?:is|represents)\s+)?|\(\s*|\s+(?:(?:which|that)\s+)?(?:is|represents|being|as)\s+)"
    r"(?:(?:essentially|simply|just|basically|merely)\s+)?(?:(?:a|an|the)\s+)?"
    r"(?:(?:mild(?:er)?|early|earlier|early-stage|initial|less\s+severe|lesser|prodromal)\s+)?"
    rf"(?:form|type|kind|variant|subtype|version|variety)\s+of\s+(?:{_AD}|dementia)"
    rf"|{_MCI}\s+is\s+(?:(?:essentially|simply|just|basically|merely)\s+)?(?:(?:a|an)\s+)?(?:(?:mild|early)\s+)?(?:{_AD}|dementia)"
    rf"|(?:mild|early)\s+(?:form\s+of\s+)?{_AD}\s*(?:\(\s*(?-i:MCI)\s*\)|,?\s*(?:also\s+)?(?:known\s+as|called)\s+{_MCI})",
    _I,
)

# c. MMSE
_MMSE_NAME = (
    r"(?:\bMMSE\b|\bmini[-\s]?mental(?:\s+state)?(?:\s+exam(?:ination)?)?\b)(?:\s*\(MMSE\))?"
)
_N, _OF30 = r"(?P<n>\d{1,2}(?:\.\d+)?)", r"(?P<of30>\s*(?:/|out\s+of)\s*30\b)"
_MMSE = (  # "MMSE ... N[/30]" and "N/30 on the MMSE"
    re.compile(rf"{_MMSE_NAME}(?P<gap>[^\d.;!?\n]{{0,40}}?){_N}{_OF30}?", _I),
    re.compile(rf"(?P<gap>){_N}{_OF30}\s+(?:on|in)\s+(?:the\s+)?{_MMSE_NAME}", _I),
)
_DIRECT = re.compile(r"[\s)]*(?:score\s*)?(?:(?:of|is|was|at|=|:)\s*)?", _I)
_COMPARATOR = re.compile(
    r"\b(?:below|above|under|over|less|greater|more|than|cut-?off|threshold|between|range|from)\b\D{0,15}$",
    _I,
)
_RANGE_AFTER = re.compile(
    r"(?:\s*/\s*30)?\s*(?:(?:or|to|-|–)\s*(?:\d|below|above|lower|higher|less|more|fewer|greater)|points?\b|%)",
    _I,
)

# d. APOE4: (pattern, claim), claim a count or "carrier"; a count None is read from the match
_APOE = r"(?:\bapo\s?e[-\s]?(?:ε|e|epsilon[-\s]?)?4|(?<!\w)(?:ε|epsilon[-\s]?)4)\b(?:\s+(?:alleles?|genes?|variants?))?"
_APOE_CLAIMS = tuple((re.compile(p, _I), claim) for p, claim in (
    (rf"\b(?P<w>no|zero|0|one|a\s+single|single|1|two|both|2)\s+(?:(?:copies|copy|alleles?)\s+(?:of\s+)?(?:the\s+)?)?{_APOE}", None),
    (rf"\bhomozyg\w*\s+(?:for\s+)?(?:the\s+)?{_APOE}|{_APOE}[\s-]+homozyg\w*", 2),
    (rf"\bheterozyg\w*\s+(?:for\s+)?(?:the\s+)?{_APOE}|{_APOE}[\s-]+heterozyg\w*", 1),
    (r"(?<!\w)(?:ε|e)(?P<a>[234])\s*/\s*(?:ε|e)(?P<b>[234])\b", None),
    (rf"{_APOE}[\s-]*(?:negative|non-?carrier)|non-?carrier\s+(?:of\s+|for\s+)?(?:the\s+)?{_APOE}|"
     rf"(?:absence\s+of|lacks?|lacking|without)\s+(?:any\s+|the\s+|an?\s+)?{_APOE}", 0),
    (rf"{_APOE}[\s-]*(?:positive|carrier\b)|\b(?:carrier\s+of|carr(?:y|ies|ying))\s+(?:the\s+|an?\s+|at\s+least\s+one\s+)?{_APOE}", "carrier"),
))  # fmt: skip
_WORD_COUNT = {
    w: n for n, ws in enumerate(("no zero 0", "one single 1", "two both 2")) for w in ws.split()
}
_COPIES = ("no copies", "one copy", "two copies")
_NEGATION = re.compile(r"(?:\b(?:not|never|neither|nor)|n't)\b(?:\s+\S+){0,3}\s*$", _I)
_OR_BEFORE = re.compile(r"\b(?:or|to)\s*$", _I)

# e. MRI findings: grade column -> (region words, the finding as a reason names it)
_REGIONS = {
    "Hippocampus": (r"hippocamp(?:al|us|i)", "hippocampal atrophy"),
    "Entorhinal": (r"entorhinal(?:\s+cort(?:ex|ices|ical))?", "entorhinal atrophy"),
    "Fusiform": (r"fusiform(?:\s+gyr(?:us|i|al))?", "fusiform atrophy"),
    "MidTemp": (r"mid(?:dle)?[-\s]?temporal(?:\s+gyr(?:us|i|al))?", "middle temporal atrophy"),
    "WholeBrain": (
        r"(?:whole[-\s]brain|global|overall|generali[sz]ed|diffuse|cerebral|cortical|cortex|brain)(?:\s+(?:brain|cortical))?",
        "overall brain atrophy",
    ),
    "Ventricles": (r"ventric(?:les?|ular)", "ventricle enlargement"),
}
_SIDE = r"(?:the\s+)?(?:(?:bilateral|left|right|lateral)\s+)?"
_ITEMS = {k: re.compile(_SIDE + p, _I) for k, (p, _) in _REGIONS.items()}
_JOIN = r"(?:\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or|as\s+well\s+as)\s+|\s*/\s*)"
_ITEM = _SIDE + "(?:" + "|".join(p for p, _ in _REGIONS.values()) + ")"
_LIST = rf"{_ITEM}(?:{_JOIN}{_ITEM}){{0,6}}"  # at most 7 regions: bounded backtracking
_TERM = (
    r"(?:atroph(?:y|ies)|volume\s+loss|shrinkage|enlargement|dilat(?:ation|ion)|expansion|widening)"
)
_ADJ = r"(?:atrophic|enlarged|dilated|shrunken)"
_SEV = r"(?:(?:severe|significant|marked|substantial|extensive|profound|prominent)(?:ly)?|pronounced|considerabl[ey]|advanced)"
_DEG = (
    rf"(?:{_SEV}|(?:mild|minimal|slight|modest|moderate)(?:ly)?|subtle|some|minor|early|borderline)"
)
_NEG = r"(?:\bno\b|without|absence\s+of|absent|lack\s+of|lacks?|free\s+of|(?:\bnot|n't)\s+(?:show|have|exhibit|demonstrate|reveal|display|indicate)s?)"
_FINDING = re.compile(
    rf"(?:(?P<neg>{_NEG})\s+(?:(?:any|evidence\s+(?:of|for)|signs?\s+of|indications?\s+of)\s+)*)?"
    rf"(?:(?P<qual>{_DEG}(?:\s+(?:and|or|to)\s+{_DEG})?)\s+)?"
    rf"(?P<body>(?P<r1>{_LIST})\s+{_TERM}|{_TERM}\s+(?:of|in|within|involving|affecting)\s+(?:both\s+)?(?P<r2>{_LIST})"
    rf"|{_ADJ}\s+(?P<r3>{_LIST})|ventriculomegaly"
    rf"|(?P<r4>{_LIST})\s+(?:is|are|appears?|seems?|looks?)\s+(?P<mid>(?:not\s+)?(?:{_DEG}\s+)?){_ADJ})"
    rf"(?:(?:\s+(?:is|are|was|were|appears?|seems?|looks?)\s+(?:to\s+be\s+)?|\s*[:=]\s*)"
    rf"(?P<post>(?:not\s+)?{_DEG}\b|absent|not\s+(?:present|seen|observed|evident|detected|noted)|none|no\b))?",
    _I,
)
_NEG_WORD = re.compile(r"\b(?:no|none|without|absen\w*|lacks?|free|not)\b|n't", _I)
_SEV_WORD, _DEG_WORD = re.compile(rf"\b{_SEV}\b", _I), re.compile(rf"\b{_DEG}\b", _I)
_ENLARGEMENT = re.compile(r"enlarg|dilat|expan|widen|ventriculomegaly", _I)


@dataclass(frozen=True)
class QualityReport:
    """Whether a rationale contradicts its record or label, and why."""

    flagged: bool
    reasons: tuple[str, ...]


def _value(record: Mapping[str, object], key: str) -> object | None:
    """A record value, with NaN read as missing."""
    value = record.get(key)
    return None if isinstance(value, float) and math.isnan(value) else value


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text) if s.strip()]


def _clause(sentence: str, start: int, end: int) -> str:
    """The clause around sentence[start:end], from its opening boundary word on."""
    cuts = list(_CLAUSE.finditer(sentence))
    left = max((c.start() for c in cuts if c.end() <= start), default=0)
    right = min((c.start() for c in cuts if c.start() >= end), default=len(sentence))
    return sentence[left:right]


def _is_general(sentence: str, m: re.Match[str]) -> bool:
    """A hypothetical sentence, or a clause about people in general: no claim on the patient."""
    return bool(_HYPOTHETICAL.search(sentence) or _GENERIC.search(_clause(sentence, *m.span())))


def argued_class(rationale: str) -> str | None:
    """Rule a: the class ("AD" | "MCI" | "CN") a rationale concludes with, or None."""
    final = parse_answer(rationale).diagnosis
    if final is not None:
        return str(final)
    argued = None
    for sentence in _sentences(rationale):
        for m in _CONCLUSION.finditer(sentence):
            before = _clause(sentence[: m.start()], m.start(), m.start())
            if not (_HEDGE.search(sentence) or _NEGATED_CUE.search(before)):
                argued = m.lastgroup
    return argued


def check_argued_class(rationale: str, label: str | None) -> list[str]:
    argued = argued_class(rationale)
    if label is None or argued is None or argued == str(label):
        return []
    return [f"argues for {argued} but the label is {label}"]


def check_class_confusion(rationale: str) -> list[str]:
    """Rule b: MCI stated to be a form of (or the same as) Alzheimer's disease or dementia."""
    quotes = (" ".join(m[0].split()) for m in _CONFUSION.finditer(rationale))
    return [
        f'states that MCI is a form of Alzheimer\'s disease or dementia ("{q}")' for q in quotes
    ]


def _stated_mmse(sentence: str, m: re.Match[str]) -> float | None:
    """The score a match states for the patient, or None for thresholds, ranges, generalities."""
    if not (m["of30"] or _DIRECT.fullmatch(m["gap"])) or _is_general(sentence, m):
        return None
    before = sentence[max(0, m.start("n") - 25) : m.start("n")]
    ranged = _COMPARATOR.search(before) or _RANGE_AFTER.match(sentence, m.end("n"))
    return None if ranged else float(m["n"])


def check_mmse(rationale: str, mmse: object | None) -> list[str]:
    """Rule c: an MMSE score stated for the patient that differs from the record."""
    if mmse is None:
        return []
    stated = [
        _stated_mmse(s, m) for s in _sentences(rationale) for p in _MMSE for m in p.finditer(s)
    ]
    return [
        f"states MMSE {n:g}/30 but the record says {float(mmse):g}/30"
        for n in stated
        if n is not None and abs(n - float(mmse)) > 0.5
    ]


def _apoe_claim(sentence: str, m: re.Match[str], claim: int | str | None) -> int | str | None:
    """The copies (0, 1, 2) or "carrier" a match claims, or None when it claims nothing exact."""
    before = sentence[: m.start()]
    if _is_general(sentence, m) or _OR_BEFORE.search(before):
        return None
    if "w" in m.re.groupindex:
        claim = _WORD_COUNT[m["w"].split()[-1].lower()]
    elif "a" in m.re.groupindex:
        claim = (m["a"] == "4") + (m["b"] == "4")
    if _NEGATION.search(before):  # "not an APOE4 carrier" is 0; "not two copies" is inexact
        return 0 if claim == "carrier" else None
    return claim


def check_apoe4(rationale: str, apoe4: object | None) -> list[str]:
    """Rule d: a stated number of APOE4 copies (or carrier status) the record contradicts."""
    if apoe4 is None:
        return []
    count, reasons = int(apoe4), []
    for sentence in _sentences(rationale):
        for pattern, default in _APOE_CLAIMS:
            for m in pattern.finditer(sentence):
                claim = _apoe_claim(sentence, m, default)
                if claim is not None and ((count == 0) if claim == "carrier" else claim != count):
                    quote = " ".join(m[0].split())
                    reasons.append(
                        f'states "{quote}" but the record says {_COPIES[count]} of APOE4'
                    )
    return reasons


Degree = Literal["No", "Mild", "Severe", "Stated"]


@dataclass(frozen=True)
class StatedFinding:
    """One MRI finding a rationale states about the patient (rule e of the module docstring)."""

    region: str
    """The grade column it names, without "grade_": Hippocampus, ..., Ventricles."""
    degree: Degree
    """No (negated), Severe (a severity word), Mild (a milder degree word: mild, moderate,
    slight ...) or Stated (no degree word)."""


def stated_findings(text: str) -> list[StatedFinding]:
    """The MRI findings `text` states about the patient, in reading order: rule e's grammar.

    Phrases in a hypothetical sentence or a general clause claim nothing, nor does a
    negated degree ("no significant atrophy"). QC flags only opposite claims (No against
    Mild/Severe, Severe against No); specificity also reads Mild and Stated.
    """
    found = []
    for sentence in _sentences(text):
        for m in _FINDING.finditer(sentence):
            degree = _finding_degree(m)
            if degree is not None and not _is_general(sentence, m):
                found += [StatedFinding(region, degree) for region in _finding_regions(m)]
    return found


def _finding_degree(m: re.Match[str]) -> Degree | None:
    """The degree a finding phrase states, or None for a negated degree."""
    words = " ".join(w for w in (m["neg"], m["qual"], m["mid"], m["post"]) if w)
    if _NEG_WORD.search(words):
        return None if _DEG_WORD.search(words) else "No"
    if _SEV_WORD.search(words):
        return "Severe"
    return "Mild" if _DEG_WORD.search(words) else "Stated"


def _finding_regions(m: re.Match[str]) -> list[str]:
    """Grade columns a finding names; ventricles only enlarge, other regions only atrophy."""
    if m["body"].lower() == "ventriculomegaly":
        return ["Ventricles"]
    items = re.split(_JOIN, m["r1"] or m["r2"] or m["r3"] or m["r4"], flags=_I)
    found = [next((k for k, p in _ITEMS.items() if p.fullmatch(item)), None) for item in items]
    enlargement = bool(_ENLARGEMENT.search(m["body"]))
    return [k for k in found if k is not None and (k == "Ventricles") == enlargement]


_OPPOSITE: dict[Degree, tuple[str, ...]] = {"No": ("Mild", "Severe"), "Severe": ("No",)}


def check_findings(rationale: str, record: Mapping[str, object]) -> list[str]:
    """Rule e: a claimed MRI finding opposite to the recorded grade."""
    reasons = []
    for finding in stated_findings(rationale):
        grade = _value(record, f"grade_{finding.region}")
        if grade in _OPPOSITE.get(finding.degree, ()):
            name = _REGIONS[finding.region][1]
            reasons.append(f"claims {finding.degree.lower()} {name} but the grade is {grade}")
    return reasons


def check_rationale(
    rationale: str, record: Mapping[str, object], label: str | None
) -> QualityReport:
    """Apply rules a-e (module docstring) to one rationale; reasons are deduplicated."""
    reasons = [
        *check_argued_class(rationale, label),
        *check_class_confusion(rationale),
        *check_mmse(rationale, _value(record, "MMSE")),
        *check_apoe4(rationale, _value(record, "APOE4")),
        *check_findings(rationale, record),
    ]
    unique = tuple(dict.fromkeys(reasons))
    return QualityReport(flagged=bool(unique), reasons=unique)
