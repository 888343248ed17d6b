"""FHIR R4 Bundles (one JSON per patient, as Synthea writes them, or NDJSON of bundles) -> timelines.

Parsing is forgiving at the resource level and strict at the value level: a resource
with an unparseable date, a non-numeric quantity or no code is quarantined with its
reason, and the rest of the bundle still goes through.
"""

from __future__ import annotations

import base64
import binascii
import re

import orjson
from datetime import datetime, timezone
from typing import Callable

from pmlm.client.ingest.deidentify import NoteText, RecordNames, Scrubber, scrub_notes
from pmlm.common.schema import IDENTIFYING_OBSERVATIONS, Event, Quarantine, Timeline, concept_id

# Resources we turn into events.
EVENT_RESOURCES = {
    "Encounter",
    "Condition",
    "Procedure",
    "Observation",
    "DiagnosticReport",
    "MedicationRequest",
    "Immunization",
    "DocumentReference",
}

# Valid FHIR R4 resources PMLM does not use (billing, administration, provenance ...): skipped
# and counted. Any other resourceType is not FHIR R4 and is quarantined.
IGNORED_RESOURCES = frozenset(
    """Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse AuditEvent
    Basic Binary BiologicallyDerivedProduct BodyStructure CapabilityStatement CarePlan CareTeam CatalogEntry
    ChargeItem ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem Communication
    CommunicationRequest CompartmentDefinition Composition ConceptMap Consent Contract Coverage
    CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric
    DeviceRequest DeviceUseStatement DocumentManifest EffectEvidenceSynthesis Endpoint EnrollmentRequest
    EnrollmentResponse EpisodeOfCare EventDefinition Evidence EvidenceVariable ExampleScenario
    ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group GuidanceResponse HealthcareService
    ImagingStudy ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
    Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
    MedicationDispense MedicationKnowledge MedicationStatement MessageDefinition MessageHeader
    MolecularSequence NamingSystem NutritionOrder ObservationDefinition OperationDefinition OperationOutcome
    Organization OrganizationAffiliation Parameters Person PlanDefinition Practitioner PractitionerRole
    Provenance Questionnaire QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition
    ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule
    SearchParameter ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition StructureMap
    Subscription Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task TerminologyCapabilities
    TestReport TestScript ValueSet VerificationResult VisionPrescription""".split()
)

# Years outside this range are placeholders or typos ("0001-01-01" is a common null sentinel), and dates
# near datetime's limits overflow when the horizon is added later: such records are quarantined.
PLAUSIBLE_YEARS = (1800, 2200)
_PARTIAL_DATE = re.compile(r"^[0-9]{4}(-[0-9]{2})?$")

# Notes scrubbed with what no record names: dates, phone numbers, addresses... (client/ingest/deidentify.py)
_PATTERNS_ONLY = Scrubber()


class ResourceError(ValueError):
    """A resource that cannot become an event; the message is the quarantine reason."""


def parse_fhir_datetime(text: object) -> datetime:
    """FHIR date/dateTime/instant -> aware UTC datetime. Partial dates take their first day."""
    if not isinstance(text, str) or not text:
        raise ResourceError(f"date is not a string: {text!r:.40}")
    s = text.strip()
    try:
        if _PARTIAL_DATE.match(s):
            dt = datetime(int(s[:4]), int(s[5:7] or 1), 1)
        else:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        dt = dt.astimezone(timezone.utc)
    except (ValueError, OverflowError):  # OverflowError: an offset pushes it past year 1 or 9999
        raise ResourceError(f"unparseable date {text!r:.40}") from None
    if not PLAUSIBLE_YEARS[0] <= dt.year <= PLAUSIBLE_YEARS[1]:
        raise ResourceError(f"implausible date {text!r:.40} (years {PLAUSIBLE_YEARS[0]}-{PLAUSIBLE_YEARS[1]} accepted)")
    return dt


def _coding(concept: object, what: str) -> tuple[str, str, str]:
    """First coding of a CodeableConcept -> (system, code, display)."""
    if not isinstance(concept, dict):
        raise ResourceError(f"missing {what}")
    codings = concept.get("coding")
    if not isinstance(codings, list) or not codings or not isinstance(codings[0], dict):
        raise ResourceError(f"{what} has no coding")
    c = codings[0]
    code = c.get("code")
    if not isinstance(code, (str, int)) or str(code).strip() == "":
        raise ResourceError(f"{what} has no code")
    display = c.get("display") or concept.get("text") or ""
    return str(c.get("system", "")), str(code), str(display)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # FHIR JSON numbers are JSON numbers; a string here is a producer bug, not a value.
        raise ResourceError(f"{what} is not numeric: {value!r:.40}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ResourceError(f"{what} is not finite")
    return float(value)


def _first_time(resource: dict, *keys: str) -> datetime:
    for key in keys:
        if key.endswith("Period"):
            period = resource.get(key)
            if isinstance(period, dict) and period.get("start") is not None:
                return parse_fhir_datetime(period["start"])
        elif resource.get(key) is not None:
            return parse_fhir_datetime(resource[key])
    raise ResourceError(f"no time ({' / '.join(keys)})")


def resource_events(resource: dict, scrub: Callable[[str], str] | None = None) -> list[Event]:
    """One FHIR resource -> zero or more events. Raises ResourceError with the reason.

    `scrub` de-identifies note text: the bundle's scrubber, which knows every name the bundle holds.
    """
    rtype = resource["resourceType"]
    if rtype == "Encounter":
        system, code, display = _coding((resource.get("type") or [None])[0], "Encounter.type")
        period = resource.get("period")
        if not isinstance(period, dict) or "start" not in period:
            raise ResourceError("Encounter.period.start missing")
        start = parse_fhir_datetime(period["start"])
        end = parse_fhir_datetime(period["end"]) if period.get("end") else None
        cls = resource.get("class") or {}
        return [Event(start, "encounter", system, code, display, end=end,
                      encounter_class=str(cls.get("code", "")) if isinstance(cls, dict) else "")]
    if rtype == "Condition":
        system, code, display = _coding(resource.get("code"), "Condition.code")
        onset = _first_time(resource, "onsetDateTime", "onsetPeriod", "recordedDate")
        abatement = resource.get("abatementDateTime")
        end = parse_fhir_datetime(abatement) if abatement else None
        return [Event(onset, "condition", system, code, display, end=end)]
    if rtype == "Procedure":
        system, code, display = _coding(resource.get("code"), "Procedure.code")
        when = _first_time(resource, "performedDateTime", "performedPeriod")
        return [Event(when, "procedure", system, code, display)]
    if rtype == "Immunization":
        system, code, display = _coding(resource.get("vaccineCode"), "Immunization.vaccineCode")
        when = _first_time(resource, "occurrenceDateTime", "recorded")
        return [Event(when, "immunization", system, code, display)]
    if rtype == "MedicationRequest":
        system, code, display = _coding(resource.get("medicationCodeableConcept"), "MedicationRequest.medication")
        when = _first_time(resource, "authoredOn")
        return [Event(when, "medication", system, code, display)]
    if rtype == "DiagnosticReport":
        if resource.get("presentedForm"):
            return []  # a note rendered as a report; the DocumentReference carries the same text
        system, code, display = _coding(resource.get("code"), "DiagnosticReport.code")
        when = _first_time(resource, "effectiveDateTime", "effectivePeriod", "issued")
        return [Event(when, "report", system, code, display)]
    if rtype == "Observation":
        return _observation_events(resource)
    if rtype == "DocumentReference":
        return [_note_event(resource, scrub or _PATTERNS_ONLY)]
    raise ResourceError(f"unsupported resource type {rtype}")


def _observation_events(resource: dict) -> list[Event]:
    system, code, display = _coding(resource.get("code"), "Observation.code")
    if concept_id(system, code) in IDENTIFYING_OBSERVATIONS:
        return []  # an address is not a clinical fact; it is dropped at the door
    when = _first_time(resource, "effectiveDateTime", "effectivePeriod", "issued")
    components = resource.get("component")
    if isinstance(components, list) and components:
        # Blood pressure and similar panels: one event per component, e.g. systolic and diastolic.
        events = []
        for comp in components:
            if not isinstance(comp, dict):
                raise ResourceError("Observation.component is not an object")
            csys, ccode, cdisp = _coding(comp.get("code"), "Observation.component.code")
            value, unit = _observation_value(comp)
            events.append(Event(when, "observation", csys, ccode, cdisp, value, unit))
        return events
    value, unit = _observation_value(resource)
    return [Event(when, "observation", system, code, display, value, unit)]


def _observation_value(holder: dict) -> tuple[float | str | None, str]:
    if "valueQuantity" in holder:
        q = holder["valueQuantity"]
        if not isinstance(q, dict):
            raise ResourceError("valueQuantity is not an object")
        return _number(q.get("value"), "valueQuantity.value"), str(q.get("unit") or q.get("code") or "")
    if "valueCodeableConcept" in holder:
        _, _, display = _coding(holder["valueCodeableConcept"], "valueCodeableConcept")
        return display, ""
    if "valueString" in holder:
        return str(holder["valueString"]), ""
    return None, ""


def _note_event(resource: dict, scrub: Callable[[str], str]) -> Event:
    system, code, display = _coding(resource.get("type"), "DocumentReference.type")
    when = _first_time(resource, "date")
    content = resource.get("content")
    try:
        attachment = content[0]["attachment"]
        raw = base64.b64decode(attachment["data"], validate=True)
        text = raw.decode("utf-8")
    except (TypeError, KeyError, IndexError):
        raise ResourceError("DocumentReference has no attachment data") from None
    except (binascii.Error, ValueError):
        raise ResourceError("DocumentReference attachment is not base64 UTF-8 text") from None
    return Event(when, "note", system, code, display, scrub(text))


def bundle_timelines(bundle: object, source: str,
                     note_text: NoteText = True) -> tuple[list[Timeline], list[Quarantine]]:
    """A parsed Bundle -> timelines (one per Patient) and quarantine records; ``note_text=False`` keeps notes
    without their text (value None), for readers that never show it; a function keeps only the notes it names."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        kind = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        return [], [Quarantine(source, f"not a FHIR Bundle (resourceType {kind!r})")]
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return [], [Quarantine(source, "Bundle has no entry list")]

    quarantined: list[Quarantine] = []
    resources = []
    patients: dict[str, Timeline] = {}
    refs: dict[str, str] = {}  # every way a resource may reference its patient -> patient id
    # Every person, organisation, place and identifier named anywhere in the bundle, including the
    # resources no event is made of (Practitioner, Organization, RelatedPerson...): notes mention them.
    names = RecordNames()
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            quarantined.append(Quarantine(source, "entry has no resource with a resourceType", f"entry {i}"))
            continue
        rtype = resource["resourceType"]
        label = f"{rtype}/{resource.get('id', f'entry {i}')}"
        names.collect(resource)
        if rtype == "Patient":
            pid = resource.get("id")
            if not isinstance(pid, str) or not pid.strip():
                quarantined.append(Quarantine(source, "Patient has no id (a non-empty string)", label))
                continue
            if pid in patients:
                quarantined.append(Quarantine(source, "a second Patient with the same id in this Bundle", label))
                continue
            try:
                birth = parse_fhir_datetime(resource["birthDate"]) if resource.get("birthDate") else None
            except ResourceError as exc:
                quarantined.append(Quarantine(source, f"Patient.birthDate: {exc}", label))
                birth = None
            patients[pid] = Timeline(pid, birth, str(resource.get("gender", "")), source)
            for ref in (pid, f"Patient/{pid}", entry.get("fullUrl")):
                if isinstance(ref, str) and ref:
                    refs[ref] = pid
        elif rtype in EVENT_RESOURCES:
            resources.append((label, resource))
        elif rtype not in IGNORED_RESOURCES:
            quarantined.append(Quarantine(source, f"unknown resource type {rtype!r}", label))

    if not patients:
        quarantined.append(Quarantine(source, "Bundle has no Patient resource"))
        return [], quarantined

    # Note text is scrubbed once her timeline is sorted, and only where it is wanted (scrub_notes).
    only = next(iter(patients)) if len(patients) == 1 else None
    for label, resource in resources:
        subject = resource.get("subject") or resource.get("patient")
        ref = subject.get("reference") if isinstance(subject, dict) else None
        if not ref:
            pid = only  # no reference: the Bundle's Patient, when it has exactly one
        else:
            pid = refs.get(ref) if isinstance(ref, str) else None
        if pid is None:
            quarantined.append(Quarantine(source, f"subject {ref!r:.80} is not a Patient in this Bundle", label))
            continue
        try:
            patients[pid].events.extend(resource_events(resource, _raw_text))
        except ResourceError as exc:
            quarantined.append(Quarantine(source, str(exc), label))
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:  # wrong JSON types deep inside
            quarantined.append(Quarantine(source, f"malformed {resource['resourceType']}: {exc!r:.200}", label))
    scrubber = names.scrubber() if note_text is not False else None
    return [scrub_notes(t.sort(), scrubber, note_text) for t in patients.values()], quarantined


def _raw_text(text: str) -> str:
    return text  # until scrub_notes, before bundle_timelines returns


def decode_json(raw: bytes, source: str, where: str = "") -> object | Quarantine:
    """Bytes of one JSON document -> the parsed document, or a quarantine record saying why not."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return Quarantine(source, f"not UTF-8 text (byte {exc.start}): FHIR JSON must be UTF-8", where)
    if not text.strip():
        return Quarantine(source, "empty file" if not where else "empty line", where)
    try:
        return orjson.loads(text)  # ~3x faster than json on 3 MB bundles
    except orjson.JSONDecodeError as exc:
        return Quarantine(source, f"invalid or truncated JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", where)
