"""A site directory's own configuration: which records it serves, under which profile, with which LLM.

`SITE_DIR/site.json` — written by `pmlm evaluate`/`pmlm demo`/the ClientApp on first run, read by
`pmlm advise` and `pmlm serve`:

    {"site_id": "hospital_a", "data_dir": "/data/ehr-export", "profile": "obgyn",
     "llm": {"base_url": "http://127.0.0.1:11434/v1", "model": "llama3"}}   # "llm" optional: embedded default
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pmlm.common.atomic import write_atomic
from pmlm.common.site_layout import SITE_JSON



class SiteConfigError(ValueError):
    pass


@dataclass
class SiteConfig:
    site_id: str
    data_dir: str
    profile: str = "obgyn"
    llm: dict = field(default_factory=dict)
    # Client certificate subjects (RFC 4514) `pmlm serve` admits; empty: the site's own CN=pmlm-client-SITE.
    allowed_clients: list = field(default_factory=list)
    # The site's own privacy policy (client/site_policy.py); empty: its defaults (epsilon 3, everything closed).
    privacy: dict = field(default_factory=dict)

    @classmethod
    def load(cls, site_dir: Path) -> "SiteConfig":
        path = Path(site_dir) / SITE_JSON
        if not path.exists():
            raise SiteConfigError(f"{site_dir} is not a PMLM site directory (no {SITE_JSON}); run `pmlm evaluate` "
                                  f"or `pmlm demo` to create one, or write it as documented in client/site_config.py")
        try:
            raw = json.loads(path.read_text())
            config = cls(site_id=str(raw["site_id"]), data_dir=str(raw["data_dir"]),
                         profile=str(raw.get("profile", "obgyn")), llm=dict(raw.get("llm") or {}),
                         allowed_clients=_subjects(raw.get("allowed_clients")),
                         privacy=dict(raw.get("privacy") or {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SiteConfigError(f"{path}: malformed site configuration ({exc})") from None
        data = Path(config.data_dir)
        if not data.is_absolute():
            config.data_dir = str((Path(site_dir) / data).resolve())
        return config

    def save(self, site_dir: Path) -> Path:
        return write_atomic(Path(site_dir) / SITE_JSON, json.dumps(asdict(self), indent=2))


def _subjects(value) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("allowed_clients must be a list of certificate subjects, e.g. \"CN=ehr-a,O=Hospital A\"")
    return [v.strip() for v in value]
