"""A small synthetic chronic-care record, built in memory: a life from birth (as the generator simulates it) with
check-ups every year, hypertension from 58, a lipid panel and blood pressure readings, and one inpatient problem
encounter. For the chronic profile's scope and wording tests; no generation needed."""

from datetime import datetime, timedelta, timezone

from pmlm.common.schema import Event, Timeline

SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
CHECKUP, PROBLEM = "162673000", "185347001"
BIRTH = datetime(1960, 3, 1, tzinfo=timezone.utc)
LAST_YEAR = 2025


def _at(year: int, day: int = 0) -> datetime:
    return datetime(year, 4, 1, tzinfo=timezone.utc) + timedelta(days=day)


def chronic_timeline(patient_id: str = "chronic-1", gender: str = "male") -> Timeline:
    events = []
    for year in range(1960, LAST_YEAR + 1):  # a check-up every year from infancy on
        events.append(Event(_at(year), "encounter", SNOMED, CHECKUP, "General examination of patient (procedure)",
                            encounter_class="AMB"))
        events.append(Event(_at(year), "observation", LOINC, "8480-6", "Systolic blood pressure", 120.0 + max(0, year - 2010),
                            "mm[Hg]"))
        events.append(Event(_at(year), "observation", LOINC, "8462-4", "Diastolic blood pressure", 80.0, "mm[Hg]"))
        if year >= 2010:
            events.append(Event(_at(year, 1), "report", LOINC, "57698-3", "Lipid panel"))
    events.append(Event(_at(2018, 2), "condition", SNOMED, "59621000", "Essential hypertension (disorder)"))
    events.append(Event(_at(2022, 30), "encounter", SNOMED, PROBLEM, "Encounter for problem", encounter_class="IMP"))
    events.append(Event(_at(2023, 30), "encounter", SNOMED, PROBLEM, "Encounter for problem", encounter_class="AMB"))
    return Timeline(patient_id, BIRTH, gender, "memory", events).sort()
