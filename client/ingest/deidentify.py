"""De-identification of record text (clinical notes) at ingest, before anything else at the site reads it.

Two layers, both applied to every note:

1. What the record itself names. A FHIR Bundle carries the names that matter most: the patient's own,
   her contacts' and relatives' (Patient.contact, RelatedPerson), her clinicians' (Practitioner,
   PractitionerRole, and the `display` of every reference to one, e.g. Encounter.participant), the
   organisations and places that cared for her (Organization, Location, serviceProvider), every
   address and telecom in the bundle, and her identifiers (MRN, SSN, licence, passport). `RecordNames`
   collects them from every resource of the bundle, used or not by the timeline, and `scrub` removes
   each wherever a note mentions it: person names token by token (a note says "Dr. Smith", not
   "Jane Smith"), organisations, streets and cities as whole phrases (their single words, "Medical",
   "Center", are ordinary words).
2. Patterns for what the record does not list: dates, phone numbers, e-mail addresses, URLs, SSN- and
   MRN-shaped identifiers, street addresses and ZIP codes, and a capitalised name after a title
   (Dr., Mrs.) or a relation word (husband, daughter). These over-remove a little rather than let a
   name through: a note is kept on-site, but parts of it are quoted into prompts for the LLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Union

from pmlm.common.schema import Timeline

# Which notes of a patient keep their text: all (True), none (False), or a function of her timeline (events sorted)
# giving the positions of those wanted. A note whose text is not wanted is never scrubbed and keeps no text.
NoteText = Union[bool, Callable[[Timeline], Collection[int]]]

NAME, ORGANISATION, ADDRESS, IDENTIFIER, CONTACT = "[name]", "[organisation]", "[address]", "[id]", "[contact]"
DATE, PHONE, EMAIL, URL = "[date]", "[phone]", "[email]", "[url]"

# Resource fields that hold a Reference whose `display` names a person or an organisation.
_PERSON_REFERENCE = re.compile(r"^(Practitioner|PractitionerRole|RelatedPerson|Patient|Person)(/|\?|$)")
_ORGANISATION_REFERENCE = re.compile(r"^(Organization|Location|HealthcareService)(/|\?|$)")
# A reference of unknown type ("urn:uuid:...") is judged by the field that holds it. Other fields
# (reasonReference, basedOn...) point at clinical resources, whose displays are clinical words that stay.
_PERSON_FIELDS = frozenset("""individual practitioner performer author requester recorder asserter attester who party
    agent subject patient beneficiary generalPractitioner careManager informant sender participant""".split())
_ORGANISATION_FIELDS = frozenset("""serviceProvider organization managingOrganization custodian provider insurer payor
    location facility issuer managingEntity onBehalfOf""".split())
# Under a person field, a display with a word that names an organisation is an organisation ("Riverside
# Clinic" as a performer), unless it starts with a title.
_ORGANISATION_WORD = re.compile(r"\b(hospital|clinic|cent(er|re)|medical|health|healthcare|care|inc|llc|ltd|"
                                r"associates|group|practice|services?|department|pharmacy|lab(oratory)?|"
                                r"university|institute|insurance|foundation|partners)\b", re.IGNORECASE)
_TITLE = re.compile(r"^(dr|mr|mrs|ms|mx|miss|prof)\.?\s", re.IGNORECASE)
# Shorter name parts are initials or noise; removing them everywhere would cut ordinary text.
MIN_NAME_PART = 2
# Parts of a HumanName or an organisation name that are not the name itself.
_NOT_A_NAME = frozenset("dr dr. mr mr. mrs mrs. ms ms. miss mx prof prof. md phd rn jr jr. sr sr. ii iii iv "
                        "inc inc. llc ltd the of and".split())


def _strip_digits(part: str) -> str:
    return part.rstrip("0123456789")  # Synthea appends digits to names; notes written by people do not


@dataclass
class RecordNames:
    """Every person, organisation, place and identifier a record names, as literal strings."""

    person_parts: set[str] = field(default_factory=set)  # given and family names, one word each
    phrases: dict[str, str] = field(default_factory=dict)  # whole phrase -> its replacement token

    def add_human_name(self, name: object) -> None:
        if isinstance(name, list):
            for item in name:
                self.add_human_name(item)
            return
        if not isinstance(name, dict):
            return
        given = name.get("given")
        parts = list(given) if isinstance(given, list) else [given]
        parts += [name.get("family")]
        for part in parts:
            if isinstance(part, str):
                for word in re.split(r"[\s,]+", part):
                    self._add_person_part(word)
        if isinstance(name.get("text"), str):
            self.add_person_display(name["text"])

    def add_person_display(self, text: str) -> None:
        """A person named in free form ("Dr. Jane123 Smith456"): each of its words, and the whole."""
        for word in re.split(r"[\s,]+", text):
            self._add_person_part(word)
        self._add_phrase(text, NAME)
        self._add_phrase(" ".join(_strip_digits(word) for word in text.split()), NAME)

    def add_organisation(self, text: object) -> None:
        if isinstance(text, str):
            self._add_phrase(text, ORGANISATION)
            self._add_phrase(_strip_digits(text), ORGANISATION)

    def add_address(self, address: object) -> None:
        if isinstance(address, list):
            for item in address:
                self.add_address(item)
            return
        if not isinstance(address, dict):
            return
        lines = address.get("line")
        for line in (lines if isinstance(lines, list) else [lines]):
            self._add_phrase(line, ADDRESS)
        for key in ("city", "district", "postalCode", "text"):
            self._add_phrase(address.get(key), ADDRESS)
        state = address.get("state")
        if isinstance(state, str) and len(state.strip()) > 2:  # "Massachusetts", not "MA" (too short to find safely)
            self._add_phrase(state, ADDRESS)

    def add_identifier(self, value: object) -> None:
        if isinstance(value, str) and len(value.strip()) >= 4:  # short values ("1", "A") are not identifying
            self._add_phrase(value, IDENTIFIER)

    def add_telecom(self, value: object) -> None:
        if isinstance(value, str) and len(value.strip()) >= 4:
            self._add_phrase(value, CONTACT)

    def _add_person_part(self, word: str) -> None:
        word = word.strip(".,;:()\"'")
        for form in (word, _strip_digits(word)):
            if len(form) >= MIN_NAME_PART and form.lower() not in _NOT_A_NAME and not form.isdigit():
                self.person_parts.add(form)

    def _add_phrase(self, text: object, token: str) -> None:
        if not isinstance(text, str):
            return
        text = " ".join(text.split())
        if len(text) >= MIN_NAME_PART and text.lower() not in _NOT_A_NAME:
            self.phrases.setdefault(text, token)

    def collect(self, resource: object) -> None:
        """Add what `resource` (any FHIR resource, or part of one) names, walking all its fields.

        Iterative, with its own stack: a hostile bundle nested a thousand levels deep is walked, not a crash.
        """
        stack = [(resource, None, "")]
        while stack:
            node, rtype, field_name = stack.pop()
            if isinstance(node, list):
                stack.extend((item, rtype, field_name) for item in node)
                continue
            if not isinstance(node, dict):
                continue
            rtype = node.get("resourceType", rtype) if isinstance(node.get("resourceType"), str) else rtype
            for key, value in node.items():
                if key == "name" and rtype in ("Organization", "Location", "HealthcareService", "InsurancePlan") \
                        and isinstance(value, str):
                    self.add_organisation(value)
                elif key == "alias" and isinstance(value, list):
                    for alias in value:
                        self.add_organisation(alias)
                elif key == "name" and isinstance(value, (list, dict)):  # HumanName: Patient, Practitioner, contact
                    self.add_human_name(value)
                elif key == "address":
                    self.add_address(value)
                elif key == "telecom" and isinstance(value, list):
                    for point in value:
                        if isinstance(point, dict):
                            self.add_telecom(point.get("value"))
                elif key == "identifier":
                    for ident in value if isinstance(value, list) else [value]:
                        if isinstance(ident, dict):
                            self.add_identifier(ident.get("value"))
                elif isinstance(value, (dict, list)):
                    # Nested resources (Bundle entries, contained) carry their own resourceType.
                    stack.append((value, rtype, key))
            self._collect_reference(node, field_name)

    def _collect_reference(self, node: dict, field_name: str) -> None:
        # A Reference ({"reference": "Practitioner/1", "display": "Dr. Jane Smith"}) names its target; a
        # Coding ({"system", "code", "display"}) names a clinical concept, which stays.
        display = node.get("display")
        if not isinstance(display, str) or "code" in node or "system" in node:
            return
        reference = node.get("reference")  # may be absent: Patient.contact.organization is often a display only
        target = reference if isinstance(reference, str) else ""
        if _PERSON_REFERENCE.match(target):
            self.add_person_display(display)
        elif _ORGANISATION_REFERENCE.match(target) or field_name in _ORGANISATION_FIELDS:
            self.add_organisation(display)
        elif field_name in _PERSON_FIELDS:
            if _TITLE.match(display) or not _ORGANISATION_WORD.search(display):
                self.add_person_display(display)
            else:
                self.add_organisation(display)

    def scrubber(self) -> "Scrubber":
        """The scrubber for this record's notes: built once, used for each of them."""
        return Scrubber(self)


class Scrubber:
    """Removes a record's own names, then the identifying patterns, from each text given."""

    def __init__(self, names: RecordNames | None = None):
        self.tokens: dict[str, str] = {}
        if names is not None:
            self.tokens = {part.lower(): NAME for part in names.person_parts}
            self.tokens.update({phrase.lower(): token for phrase, token in names.phrases.items()})
        self.pattern = None
        if self.tokens:
            # Longest first, so a phrase goes before its words; whitespace inside a phrase may be any
            # whitespace in the note (an address over two lines).
            alternatives = "|".join(r"\s+".join(re.escape(word) for word in literal.split())
                                    for literal in sorted(self.tokens, key=len, reverse=True))
            self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def _replace(self, match: re.Match) -> str:
        found = match.group(0)
        # One lower-case word is an ordinary word ("will", "hope", "brown"), not the name it spells: people
        # write names capitalised (or in capitals). Longer phrases and numbers are taken in any case.
        if found[0].islower() and not any(ch.isspace() for ch in found):
            return found
        return self.tokens.get(" ".join(found.split()).lower(), NAME)

    def __call__(self, text: str) -> str:
        if self.pattern is not None:
            text = self.pattern.sub(self._replace, text)
        # Cues are only trusted on ASCII text: elsewhere IGNORECASE folds letters lower() keeps apart (the long s
        # matches "s", the Kelvin sign "k"), so a hostile note could hide an identifier from its cue.
        cued = text.isascii()
        lower = text.lower()
        for regex, token, cue in PATTERNS:
            if not cued or cue is None or any(literal in lower for literal in cue):
                text = regex.sub(_relation_name if token is None else token, text)
                lower = text.lower()  # the tokens written are ASCII, so the text stays as ASCII as it was
        return text


_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_STREET_WORDS = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
                 r"Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq)")
_RELATIONS = (r"(?:husband|wife|partner|spouse|mother|father|mom|dad|sister|brother|son|daughter|aunt|uncle|"
              r"grandmother|grandfather|cousin|niece|nephew|friend|guardian|fianc[eé]e?|boyfriend|girlfriend)")
_CAPITALISED = r"[A-Z][a-zA-Z'\-]+"

# (pattern, replacement, cue), applied in order after the record's own names. A pattern with a cue can only match
# a text whose lower-case form contains one of the cue's literals, so a note without any is not scanned by it (a
# regex pass over a 1 kB note costs 20-120 us; reading the sample's 22,000 notes spent most of its time here).
# The cue is a necessary condition, never a filter of its own: tests compare the result with every pattern run.
_MONTH_CUES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_RELATION_CUES = ("husband", "wife", "partner", "spouse", "mother", "father", "mom", "dad", "sister", "brother",
                  "son", "daughter", "aunt", "uncle", "cousin", "niece", "nephew", "friend", "guardian", "fianc",
                  "boyfriend", "girlfriend")  # grandmother/grandfather contain mother/father
PATTERNS: list[tuple[re.Pattern, str | None, tuple[str, ...] | None]] = [
    (re.compile(r"\b(?:https?://|www\.)[^\s<>\"')]*[^\s<>\"').,;:!?]", re.IGNORECASE),  # not the full stop after it
     URL, ("http", "www.")),
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), EMAIL, ("@",)),
    # Dates: ISO (with a time), numeric day/month/year, and written out ("March 3, 2024", "3 Mar 2024", "March 2024").
    (re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?(?!\d)"),
     DATE, ("-",)),
    (re.compile(r"(?<![\d/.])\d{1,2}[/.]\d{1,2}[/.](?:\d{4}|\d{2})(?!\d|[/.]\d)"), DATE, ("/", ".")),
    (re.compile(rf"\b{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", re.IGNORECASE), DATE, _MONTH_CUES),
    (re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS}\.?,?\s+\d{{4}}\b", re.IGNORECASE),
     DATE, _MONTH_CUES),
    (re.compile(rf"\b{_MONTHS}\.?\s+(?:19|20)\d{{2}}\b", re.IGNORECASE), DATE, _MONTH_CUES),
    # Identifiers: labelled ones ("MRN: A12345"), SSN-shaped, and long digit runs (record numbers, accounts).
    (re.compile(r"\b(?:MRN|SSN|medical\s+record(?:\s+(?:number|no\.?))?|record\s+(?:number|no\.?)|account(?:\s+no\.?)?|"
                r"patient\s+id|insurance\s+id|policy(?:\s+no\.?)?)\s*[:#]?\s*[A-Z0-9][\w-]*\d[\w-]*", re.IGNORECASE),
     IDENTIFIER, ("mrn", "ssn", "record", "account", "patient", "insurance", "policy")),
    (re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"), IDENTIFIER, ("-",)),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE),
     IDENTIFIER, ("-",)),
    (re.compile(r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s*|(?<!\d)\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)"), PHONE, None),
    (re.compile(r"\b[A-Z]{0,3}\d{6,}[A-Z]{0,3}\b"), IDENTIFIER, None),
    # Addresses: a number and a street name, a PO box, and a state code with its ZIP code.
    (re.compile(rf"\b\d{{1,6}}[A-Za-z]?\s+(?:{_CAPITALISED}\.?\s+){{1,4}}{_STREET_WORDS}\b\.?"
                rf"(?:,?\s*(?:Apt|Apartment|Suite|Unit|#)\.?\s*\w+)?"), ADDRESS, None),
    (re.compile(r"\bP\.?\s?O\.?\s+Box\s+\d+\b", re.IGNORECASE), ADDRESS, ("box",)),
    (re.compile(r"\b[A-Z]{2}\s+\d{5}(?:-\d{4})?\b"), ADDRESS, None),
    # A capitalised word or two after a title or a relation word is a name the record did not list.
    (re.compile(rf"\b(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof)\.?\s+{_CAPITALISED}(?:\s+{_CAPITALISED})?"),
     NAME, ("dr", "mr", "ms", "mx", "miss", "prof")),
    (re.compile(rf"\b(?i:({_RELATIONS}))(,?\s+)({_CAPITALISED}(?:\s+{_CAPITALISED})?)"), None, _RELATION_CUES),
]


def _relation_name(match: re.Match) -> str:
    return f"{match.group(1)}{match.group(2)}{NAME}"


def scrub_notes(timeline: Timeline, scrub_text: Callable[[str], str], note_text: NoteText) -> Timeline:
    """Her notes' text scrubbed where `note_text` wants it and dropped (None) elsewhere; `timeline` is sorted."""
    every = not callable(note_text) and bool(note_text)
    wanted = note_text(timeline) if callable(note_text) else ()
    for i, event in enumerate(timeline.events):
        if event.kind == "note" and isinstance(event.value, str):
            event.value = scrub_text(event.value) if every or i in wanted else None
    return timeline


def scrub(text: str, names: RecordNames | None = None) -> str:
    """`text` without the record's named people, organisations, places and identifiers, nor identifying patterns."""
    return Scrubber(names)(text)
