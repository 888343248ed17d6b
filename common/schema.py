"""Canonical patient timelines: what every ingest path produces and every phase reads.

A timeline holds typed care events sorted by time. It carries no name, address or
record number: ingest keeps only the pseudonymous patient id (which never leaves the
site) and the facts the task needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

# The kinds of care event PMLM understands. "report" is a lab panel (DiagnosticReport).
EVENT_KINDS = (
    "encounter",
    "condition",
    "procedure",
    "observation",
    "report",
    "medication",
    "immunization",
    "note",
)

# Terminology URLs as they appear in FHIR, and the short prefixes used in concept ids.
SYSTEM_PREFIX = {
    "http://snomed.info/sct": "snomed",
    "http://loinc.org": "loinc",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "rxnorm",
    "http://hl7.org/fhir/sid/cvx": "cvx",
    "http://hl7.org/fhir/sid/icd-10-cm": "icd10",
    "http://www.ama-assn.org/go/cpt": "cpt",
}


# Observations whose value is a direct identifier (the SDOH screening's street address): never kept.
IDENTIFYING_OBSERVATIONS = frozenset({"loinc:56799-0"})


# A site's records name a few thousand concepts over millions of events: each id is built once.
@lru_cache(maxsize=1 << 16)
def concept_id(system: str, code: str) -> str:
    """Stable id of a coded concept, e.g. ``snomed:424619006``."""
    prefix = SYSTEM_PREFIX.get(system, system.rstrip("/").rsplit("/", 1)[-1].lower() or "local")
    return f"{prefix}:{code}"


@dataclass(slots=True)
class Event:
    time: datetime  # timezone-aware UTC
    kind: str
    system: str
    code: str
    display: str
    value: float | str | None = None  # numeric for quantities, text for notes/coded answers
    unit: str = ""
    end: datetime | None = None  # encounter end, condition abatement
    encounter_class: str = ""  # AMB, EMER, IMP, WELLNESS ... (encounters only)

    @property
    def concept(self) -> str:
        return concept_id(self.system, self.code)


@dataclass(slots=True)
class Timeline:
    patient_id: str
    birth_date: datetime | None = None
    gender: str = ""
    source: str = ""  # file the record came from (site-local, for quarantine and inspect)
    events: list[Event] = field(default_factory=list)

    def sort(self) -> "Timeline":
        # Encounters first at equal times so an encounter precedes what happened during it.
        self.events.sort(key=lambda e: (e.time, e.kind != "encounter"))
        return self

    def age_at(self, when: datetime) -> float | None:
        if self.birth_date is None:
            return None
        return (when - self.birth_date).days / 365.25


@dataclass(slots=True)
class Quarantine:
    """One rejected input: where it came from and why. Nothing is dropped silently."""

    file: str
    reason: str
    resource: str = ""  # e.g. "Observation/abc" or "line 17"

    def as_dict(self) -> dict:
        return {"file": self.file, "resource": self.resource, "reason": self.reason}
