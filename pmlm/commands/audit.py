"""`pmlm audit`: check privacy ledgers and report what each site released and spent.

  pmlm audit verify LEDGER...                 exit 0 only if every ledger verifies
  pmlm audit report LEDGER... --out DIR [--json] [--membership FILE...]
  pmlm audit membership SITE_DIR [--data DIR] [--out DIR]   attack the site's artifacts (runs on-site)
  pmlm audit egress SITE_DIR [--json]         what left the site, message by message (SITE_DIR/egress.jsonl)
  pmlm audit access SITE_DIR [--patient ID] [--json]   who called `pmlm serve` for which patient

LEDGER is a site's ledger (SITE_DIR/ledger/privacy_ledger.jsonl, or just SITE_DIR, or a folder of
site directories such as a run's WORKDIR/sites, or the WORKDIR, or the demo's OUT) or a coordinator's copy
(STATE_DIR/ledger_copies/SITE.jsonl). A site ledger is checked against what
the auditor pins, never against the key lying beside it (whoever rewrote the ledger could have
replaced that too): --public-key SITE=FILE, --fingerprint SITE=HEX, or --anchors STATE_DIR, the
coordinator's registry (its pinned site keys, and the head it countersigned for each site: a
ledger shorter than that head, or different at it, fails as truncated or rewritten). Without a
pin, only internal consistency is checked, and verify fails unless --trust-embedded-key accepts
that. A copy is checked against its own coordinator's registry (STATE_DIR/site_keys/SITE.pub).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pmlm.cli import CliError
from pmlm.common.atomic import write_atomic

if TYPE_CHECKING:
    from pmlm.reports.audit import AuditedLedger

# The privacy modules pull in dp-accounting (about 2 s of imports): they are imported inside
# the handlers so that building the `pmlm` parser stays fast for every other command.

MAX_PROBLEMS_SHOWN = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    audit = subparsers.add_parser("audit", help="verify privacy ledgers and write audit reports",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    def add_common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ledgers", nargs="+", type=Path, metavar="LEDGER",
                            help="a ledger file (a site's or a coordinator's copy), a site directory, a directory "
                                 "of site directories (WORKDIR/sites), a run's WORKDIR or the demo's OUT directory; "
                                 "repeatable")
        parser.add_argument("--public-key", "--key", action="append", default=[], metavar="SITE=FILE",
                            help="pinned Ed25519 public key (PEM) of a site; repeatable")
        parser.add_argument("--fingerprint", action="append", default=[], metavar="SITE=HEX",
                            help="pinned fingerprint of a site's key (as the ledger's open entry shows it, "
                                 "sha256:..., at least 32 hex digits); repeatable")
        parser.add_argument("--anchors", type=Path, metavar="STATE_DIR",
                            help="the coordinator's ledger-copy state directory (or the coordinator workdir "
                                 "holding ledger-copies/): its pinned site keys and countersigned heads")
        parser.add_argument("--coordinator-key", type=Path, metavar="FILE",
                            help="trusted coordinator public key for copies and heads (default: STATE_DIR/keys/...)")

    verify = commands.add_parser("verify", help="check chains, signatures, monotone ε, and re-compute every ε")
    add_common(verify)
    verify.add_argument("--trust-embedded-key", action="store_true",
                        help="when no key is pinned, accept a check of signatures against the key inside the "
                             "ledger (proves consistency only, not authorship or completeness)")
    verify.set_defaults(handler=run_verify)

    report = commands.add_parser("report", help="write a self-contained HTML report (and JSON with --json)")
    add_common(report)
    report.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    report.add_argument("--json", action="store_true",
                        help="also write DIR/privacy_summary.json and print it: per site "
                             "{epsilon, epsilon_rdp, delta, budget, releases}")
    report.add_argument("--membership", action="append", default=[], type=Path, metavar="FILE",
                        help="a site's `pmlm audit membership` result to show (repeatable); a site ledger's own "
                             "SITE_DIR/audit/membership.json is shown without it")
    report.set_defaults(handler=run_report)

    membership = commands.add_parser(
        "membership", help="membership-inference attacks on the site's released artifacts, against their DP bound",
        description="Runs at the site (it needs the site's records): attacks the phase-A model and the peer "
                    "profiles with the site's own training and held-out patients and writes aggregate figures "
                    "only (see client/membership_audit.py), for `pmlm audit report`.")
    membership.add_argument("site_dir", type=Path, metavar="SITE_DIR", help="the site directory (with site.json)")
    membership.add_argument("--data", type=Path, metavar="DIR", help="the site's records (default: site.json's data_dir)")
    membership.add_argument("--out", type=Path, metavar="DIR",
                            help="directory for membership.json (default: SITE_DIR/audit, where `pmlm audit report` "
                                 "finds it); a path ending in .json names the file itself")
    membership.set_defaults(handler=run_membership)

    egress = commands.add_parser("egress", help="show every message the site sent (its egress log)")
    egress.add_argument("site_dir", type=Path, metavar="SITE_DIR", help="the site directory (with egress.jsonl)")
    egress.add_argument("--json", action="store_true",
                        help="print {site_dir, log, messages, totals, problems} as JSON instead of a table")
    egress.set_defaults(handler=run_egress)

    access = commands.add_parser("access", help="who called the site's services for which patient (its access log)")
    access.add_argument("site_dir", type=Path, metavar="SITE_DIR",
                        help="the site directory (with audit/access_log.jsonl)")
    access.add_argument("--patient", metavar="ID", help="only the calls that named this patient")
    access.add_argument("--json", action="store_true", help="print {site_dir, log, calls, problems} as JSON")
    access.set_defaults(handler=run_access)


def _key_overrides(pairs: list[str]) -> dict[str, Path]:
    keys = {}
    for pair in pairs:
        site, sep, file = pair.partition("=")
        if not sep or not site or not file:
            raise CliError(f"--public-key expects SITE=FILE, got {pair!r}")
        keys[site] = Path(file)
    return keys


def _fingerprint_pins(pairs: list[str]) -> dict[str, str]:
    pins = {}
    for pair in pairs:
        site, sep, value = pair.partition("=")
        digits = value.strip().lower().removeprefix("sha256:").replace(":", "")
        if not sep or not site or len(digits) < 32 or any(c not in "0123456789abcdef" for c in digits):
            raise CliError(f"--fingerprint expects SITE=HEX with at least 32 hex digits, got {pair!r}")
        pins[site] = digits
    return pins


def _fingerprint_matches(key, digits: str) -> bool:
    import hashlib

    return hashlib.sha256(key.public_bytes_raw()).hexdigest().startswith(digits)


def _anchor_dir(path: Path) -> Path:
    """The coordinator's ledger-copy state dir, also when given the coordinator workdir above it."""
    from pmlm.server.ledger_copy import LEDGER_COPIES_DIR
    from pmlm.server.ledger_copy import SITE_KEYS_DIR

    if not path.is_dir():
        raise CliError(f"--anchors {path} is not a directory")
    if not (path / SITE_KEYS_DIR).is_dir() and (path / LEDGER_COPIES_DIR / SITE_KEYS_DIR).is_dir():
        return path / LEDGER_COPIES_DIR
    return path


def _anchored_head(anchors: Path, site_id: str, coordinator_key: Path | None) -> tuple[dict | None, str | None]:
    """(head, problem): the head the coordinator countersigned for `site_id`, else the last entry of its copy."""
    from pmlm.server.ledger_copy import COORDINATOR_KEY_PATH, COPIES_DIR, HEADS_DIR, head_of, read_copy, read_head

    coord_file = coordinator_key or anchors / (str(COORDINATOR_KEY_PATH) + ".pub")
    if not coord_file.is_file():
        return None, f"no coordinator public key at {coord_file}: the anchored head cannot be checked"
    coord_key = _load_key(coord_file)
    head = read_head(anchors / HEADS_DIR / f"{site_id}.json", coord_key)
    if isinstance(head, str):
        return None, f"the anchored head fails verification: {head}"
    if head is not None:
        return head, None
    copy = anchors / COPIES_DIR / f"{site_id}.jsonl"
    if copy.is_file():  # a copy kept before heads were written
        replay, problems, _ = read_copy(copy, coord_key, None)
        if problems:
            return None, f"the coordinator's copy {copy} fails verification: {problems[0]}"
        if replay.entries:
            return head_of(site_id, replay), None
    return None, f"the anchors {anchors} hold no head for site {site_id!r}: truncation cannot be ruled out"


def _first_record(path: Path) -> dict:
    # Only to learn the site id and the file's kind; verification re-reads everything.
    try:
        with open(path, "rb") as f:
            record = json.loads(f.readline())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _load_key(path: Path):
    from pmlm.common.privacy.signing import KeyFileError, load_public_key

    try:
        return load_public_key(path)
    except KeyFileError as exc:
        raise CliError(str(exc)) from None


def audit_ledger(path: Path, overrides: dict[str, Path], coordinator_key: Path | None,
                 trust_embedded_key: bool, fingerprints: dict[str, str] | None = None,
                 anchors: Path | None = None) -> AuditedLedger:
    """Verify one ledger or coordinator copy against the key (and head) the auditor pinned."""
    from pmlm.common.privacy.ledger import verify_ledger
    from pmlm.common.site_layout import LEDGER_PATH
    from pmlm.reports.audit import AuditedLedger
    from pmlm.common.privacy.signing import KeyFileError, key_fingerprint, public_key_from_b64
    from pmlm.server.ledger_copy import COORDINATOR_KEY_PATH, SITE_KEYS_DIR, check_against_head, read_copy

    if path.is_dir() and (path / LEDGER_PATH).is_file():  # a site directory
        path = path / LEDGER_PATH
    if not path.is_file():
        raise CliError(f"no such ledger file: {path}")
    fingerprints = fingerprints or {}
    first = _first_record(path)
    is_copy = "countersignature" in first
    site_entry = first.get("site_entry") if is_copy else first
    site_id = site_entry.get("site_id") if isinstance(site_entry, dict) else None
    # Where a pinned key may come from, most explicit first. A site ledger's own SITE_DIR/keys is never one.
    candidates = [("--public-key", overrides.get(site_id))]
    if anchors is not None:
        candidates.append(("the coordinator's registry", anchors / SITE_KEYS_DIR / f"{site_id}.pub"))
    if is_copy:
        candidates.append(("the copy's coordinator registry", path.parent.parent / SITE_KEYS_DIR / f"{site_id}.pub"))
    source, key_file = next(((s, f) for s, f in candidates if f is not None and (s == "--public-key" or f.is_file())),
                            (None, None))
    site_key = _load_key(key_file) if key_file else None
    problems: list[str] = []
    pin = fingerprints.get(site_id)
    if pin is not None:
        try:
            embedded = public_key_from_b64((site_entry or {}).get("public_key"))
        except KeyFileError:
            embedded = None
        checked = site_key or embedded
        if checked is None or not _fingerprint_matches(checked, pin):
            problems.append(f"the ledger's key {key_fingerprint(checked) if checked else '(none)'} does not match "
                            f"the pinned fingerprint {pin} of site {site_id!r}")
        elif site_key is None:
            site_key, source = embedded, f"--fingerprint {pin}"
    if site_key is not None:
        key_note = f"signatures checked with pinned key {key_fingerprint(site_key)} from {source}" + (
            f" ({key_file})" if key_file else "")
    else:
        key_note = ("no pinned key: only internal consistency checked (signatures against the key embedded in "
                    "the ledger, which whoever rewrote it could replace)")
        if not trust_embedded_key:
            problems.append(
                f"no pinned key for site {site_id!r}: only the ledger's internal consistency was checked, not who "
                f"wrote it; pin one with --public-key {site_id}=FILE, --fingerprint {site_id}=HEX or --anchors "
                f"STATE_DIR, or pass --trust-embedded-key to accept a consistency-only check")
    if is_copy:
        coord_file = coordinator_key or path.parent.parent / (str(COORDINATOR_KEY_PATH) + ".pub")
        coord_key = _load_key(coord_file) if coordinator_key or coord_file.is_file() else None
        if coord_key is None:
            problems.append(f"no coordinator public key (looked for {coord_file}); pass --coordinator-key FILE")
        replay, copy_problems, _ = read_copy(path, coord_key, site_key)
        problems += [str(p) for p in copy_problems]
        kind = "coordinator copy"
    else:
        replay = verify_ledger(path, site_key)
        problems += [str(p) for p in replay.problems]
        kind = "site ledger"
        if anchors is not None:
            head, why = _anchored_head(anchors, site_id, coordinator_key)
            why = why or check_against_head(replay.entries, head)
            if why:
                problems.insert(0, why)  # the headline: a truncated ledger is otherwise internally consistent
            else:
                key_note += f"; holds the head the coordinator anchored (entry {head['seq']})"
    if replay.genesis is None and not problems:
        problems.append("the ledger has no open entry")
    return AuditedLedger(path=path, kind=kind, replay=replay, problems=problems, key_note=key_note)


def ledger_files(path: Path) -> list[Path]:
    """The ledgers a LEDGER argument names: a file as it is; a site directory's ledger; every site's ledger in a
    directory of sites (a run's WORKDIR/sites), a run's work directory (WORKDIR, holding sites/) or the demo's
    out directory (OUT/work/sites)."""
    from pmlm.common.site_layout import LEDGER_PATH

    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CliError(f"no such ledger file or site directory: {path}")
    if (path / LEDGER_PATH).is_file():
        return [path / LEDGER_PATH]
    for sites in (path, path / "sites", path / "work" / "sites"):
        found = sorted(child / LEDGER_PATH for child in sites.glob("*") if (child / LEDGER_PATH).is_file())
        if found:
            return found
    raise CliError(f"{path} is a directory but holds no site ledger (looked for {path / LEDGER_PATH}, "
                   f"{path / '*' / LEDGER_PATH}, {path / 'sites' / '*' / LEDGER_PATH} and "
                   f"{path / 'work' / 'sites' / '*' / LEDGER_PATH})")


def _audit_all(args: argparse.Namespace, trust_embedded_key: bool) -> list[AuditedLedger]:
    args.ledgers = [file for path in args.ledgers for file in ledger_files(path)]
    overrides = _key_overrides(args.public_key)
    fingerprints = _fingerprint_pins(args.fingerprint)
    anchors = _anchor_dir(args.anchors) if args.anchors is not None else None
    return [audit_ledger(p, overrides, args.coordinator_key, trust_embedded_key, fingerprints, anchors)
            for p in args.ledgers]


def _describe(ledger: AuditedLedger) -> str:
    replay = ledger.replay
    releases, refusals = len(ledger.releases()), len(ledger.refusals())
    parts = [f"site {ledger.site_id}", f"{len(replay.entries)} entries ({releases} release{'s' * (releases != 1)}, "
                                         f"{refusals} refusal{'s' * (refusals != 1)})"]
    if replay.state is not None:
        from pmlm.common.privacy.accountant import describe_spent

        for unit in ledger.units():
            spent = replay.state.spent(unit)
            parts.append(f"{unit} " + describe_spent(spent.pld, replay.budget.epsilon_total, spent.rdp,
                                                       delta=replay.budget.delta))
            shared = ledger.shared_noise(unit)
            if shared is not None:
                parts.append(shared)
    return ", ".join(parts)


def run_verify(args: argparse.Namespace) -> int:
    ledgers = _audit_all(args, args.trust_embedded_key)
    for ledger in ledgers:
        if ledger.verified:
            print(f"OK    {ledger.path} [{ledger.kind}]: {_describe(ledger)}; {ledger.key_note}")
            continue
        print(f"FAIL  {ledger.path} [{ledger.kind}]: {ledger.problems[0]}")
        for problem in ledger.problems[1:MAX_PROBLEMS_SHOWN]:
            print(f"      also {problem}")
        if len(ledger.problems) > MAX_PROBLEMS_SHOWN:
            print(f"      ... and {len(ledger.problems) - MAX_PROBLEMS_SHOWN} more")
    failed = sum(not ledger.verified for ledger in ledgers)
    print(f"{len(ledgers) - failed} of {len(ledgers)} ledgers verified")
    return 0 if failed == 0 else 1


def run_report(args: argparse.Namespace) -> int:
    from pmlm.reports.audit import summaries, write_report

    # A report is still written when a check fails (it says so prominently); the exit code tells scripts.
    ledgers = _audit_all(args, trust_embedded_key=True)
    membership = _membership_results(args.membership, args.ledgers)
    html_path = write_report(ledgers, args.out, membership)
    # With --json, stdout carries only the JSON so it can be piped.
    print(f"wrote {html_path}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        text = json.dumps(summaries(ledgers, membership), indent=2, sort_keys=True)
        json_path = write_atomic(args.out / "privacy_summary.json", text + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
        print(text)
    failed = [ledger for ledger in ledgers if not ledger.verified]
    for ledger in failed:
        print(f"warning: {ledger.path} failed verification: {ledger.problems[0]}", file=sys.stderr)
    return 1 if failed else 0


# -- pmlm audit membership -------------------------------------------------------------------------------

def run_membership(args: argparse.Namespace) -> int:
    from pmlm.client.membership_audit import MembershipAuditError, audit_site, write_audit
    from pmlm.client.site_config import SiteConfigError

    try:
        result = audit_site(args.site_dir, args.data)
    except (MembershipAuditError, SiteConfigError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    path = write_audit(result, membership_out(args.site_dir, args.out))
    print(f"site {result['site_id']}: {result['patients']} patients; wrote {path}")
    print(f"{'artifact':<22} {'attack':<23} {'members/held out':>16} {'ε':>6} {'bound':>6} {'best (chance)':>14} "
          f"{'held out (95% CI)':>24}  verdict")
    for artifact in result["artifacts"]:
        eps, bound = artifact["epsilon"], artifact["bound"]
        for attack in artifact["attacks"]:
            low, high = attack["advantage_ci"]
            print(f"{artifact['artifact']:<22} {attack['attack']:<23} "
                  f"{attack['members']:>8}/{attack['non_members']:<7} {'-' if eps is None else f'{eps:.3g}':>6} "
                  f"{'-' if bound is None else f'{bound:.3f}':>6} {attack['advantage']:>6.3f} ({attack['null_advantage']:.3f}) "
                  f"{attack['held_out_advantage']:>6.3f} ({low:+.3f} to {high:+.3f})  {attack['verdict']}")
        if artifact["note"]:
            print(f"  note ({artifact['artifact']}): {artifact['note']}")
    return 0 if all(a["consistent"] for art in result["artifacts"] for a in art["attacks"]) else 1


def membership_out(site_dir: Path, out: Path | None) -> Path:
    """Where `audit membership` writes: --out is a directory, as everywhere (a path ending in .json, the old
    meaning, still names the file); without it SITE_DIR/audit/membership.json, where `audit report` looks."""
    from pmlm.common.site_layout import MEMBERSHIP_JSON

    if out is None:
        return site_dir / MEMBERSHIP_JSON
    return out if out.suffix.lower() == ".json" else out / MEMBERSHIP_JSON.name


def _membership_results(files: list[Path], ledgers: list[Path]) -> list[dict]:
    """The results named with --membership, plus SITE_DIR/audit/membership.json beside each site ledger."""
    from pmlm.common.privacy.membership import FORMAT
    from pmlm.common.site_layout import LEDGER_PATH, MEMBERSHIP_JSON

    beside = [p.parents[len(LEDGER_PATH.parts) - 1] / MEMBERSHIP_JSON for p in ledgers
              if p.name == LEDGER_PATH.name and len(p.parents) >= len(LEDGER_PATH.parts)]
    results = []
    for path in dict.fromkeys([*files, *(p for p in beside if p.is_file())]):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read the membership audit {path}: {exc}") from None
        if not isinstance(result, dict) or result.get("format") != FORMAT:
            raise CliError(f"{path} is not a `pmlm audit membership` result (format {FORMAT})")
        results.append(result)
    return results


# -- pmlm audit egress -----------------------------------------------------------------------------------

EGRESS_SHOWN_ITEMS = 4  # per record in the table; --json has everything


def run_egress(args: argparse.Namespace) -> int:
    from pmlm.client.egress import egress_log_path, egress_totals, fields_outside_public_list, read_egress_log

    log = egress_log_path(args.site_dir)
    if not log.is_file():
        raise CliError(f"no egress log at {log}: is {args.site_dir} a site directory, and has the site sent "
                       f"anything yet?")
    entries, problems = read_egress_log(args.site_dir)
    totals = egress_totals(entries)
    outside = fields_outside_public_list(entries)
    if args.json:
        print(json.dumps({"site_dir": str(args.site_dir), "log": str(log), "messages": entries,
                          "totals": totals, "problems": problems, "outside_public_list": outside},
                         indent=2, sort_keys=True))
    else:
        _print_egress_table(log, entries, totals)
        if outside:
            print(f"\n{len(outside)} field(s) outside the public list (client/egress.py PUBLIC_FIELDS, the README's "
                  f"threat model):")
            for finding in outside[:50]:
                print(f"  {finding}")
        else:
            print("\nevery field that left is on the public list (client/egress.py PUBLIC_FIELDS)")
    for problem in problems:
        print(f"warning: unreadable line kept out of the table: {problem}", file=sys.stderr)
    return 1 if problems or outside else 0


def _print_egress_table(log: Path, entries: list[dict], totals: dict[str, dict[str, int]]) -> None:
    sites = sorted({str(e.get("site_id")) for e in entries})
    print(f"egress log {log} (site {', '.join(sites) or '?'}): {len(entries)} messages")
    print(f"{'#':>4}  {'time (UTC)':<24} {'type':<38} {'round':>5} {'bytes':>11}  content sha256")
    for number, entry in enumerate(entries, start=1):
        kind = str(entry["message_type"]) + (f" [{entry['stage']}]" if entry.get("stage") else "")
        digest = str(entry.get("content_sha256") or "-")[:16]
        print(f"{number:>4}  {str(entry.get('time', '')):<24} {kind:<38} {str(entry.get('round', '')):>5} "
              f"{int(entry.get('size_bytes') or 0):>11,}  {digest}")
        if "error" in entry:
            print(f"{'':>6}error {entry['error'].get('code')}: {entry['error'].get('reason')}")
        for name, items in (entry.get("summary") or {}).items():
            print(f"{'':>6}{name}: {_summary_line(items)}")
    print()
    print(f"{'totals by type':<46} {'messages':>8} {'bytes':>13} {'errors':>7}")
    for kind, row in sorted(totals.items()):
        print(f"{kind:<46} {row['messages']:>8} {row['bytes']:>13,} {row['errors']:>7}")
    print(f"{'all':<46} {sum(r['messages'] for r in totals.values()):>8} "
          f"{sum(r['bytes'] for r in totals.values()):>13,} {sum(r['errors'] for r in totals.values()):>7}")


def _summary_line(items: dict) -> str:
    """A record's summary on one line: its first few items, each cut short."""
    shown = []
    for key, value in list(items.items())[:EGRESS_SHOWN_ITEMS]:
        if isinstance(value, dict) and "shape" in value:  # an array: shape, dtype, L2 norm
            norm = value.get("l2_norm")
            text = f"{tuple(value['shape'])} {value.get('dtype')}" + (f" |x|={norm:.4g}" if isinstance(norm, float)
                                                                        else "")
        else:
            text = json.dumps(value)
        shown.append(f"{key}={text if len(text) <= 60 else text[:57] + '...'}")
    more = len(items) - EGRESS_SHOWN_ITEMS
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def run_access(args: argparse.Namespace) -> int:
    """`pmlm audit access`: the site's per-patient access log (`pmlm serve` writes it), as a table or JSON."""
    from pmlm.client.access_log import access_log_path, read_access_log

    log = access_log_path(args.site_dir)
    if not log.is_file():
        raise CliError(f"no access log at {log}: is {args.site_dir} a site directory, and has `pmlm serve` "
                       f"answered a call there yet?")
    calls, problems = read_access_log(args.site_dir, args.patient)
    if args.json:
        print(json.dumps({"site_dir": str(args.site_dir), "log": str(log), "calls": calls, "problems": problems},
                         indent=2, sort_keys=True))
    else:
        which = f" naming patient {args.patient}" if args.patient is not None else ""
        print(f"access log {log}: {len(calls)} calls{which}")
        print(f"{'time (UTC)':<30} {'outcome':<20} {'rpc':<40} {'patient':<24} caller")
        for call in calls:
            print(f"{call['time']:<30} {call['outcome']:<20} {call['rpc']:<40} {call['patient'] or '-':<24} "
                  f"{call['caller'] or '(no certificate, loopback)'}")
        denied = sum(1 for c in calls if c["outcome"] == "PERMISSION_DENIED")
        if denied:
            print(f"{denied} calls were refused: the caller is not authorised for this site")
    for problem in problems:
        print(f"warning: unreadable line kept out of the table: {problem}", file=sys.stderr)
    return 1 if problems else 0
