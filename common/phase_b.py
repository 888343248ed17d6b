"""Phase B's contract: its settings, message names and the peer profiles' codec. Phase B finds prototypes of
patients (DP k-means on the phase-A embeddings, summed over sites) and the event profile of each, the global
peer profiles every site keeps: client/phase_b.py is a site's side, server/phase_b.py the coordinator's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from pmlm.common.peer_profiles import PeerProfiles

PHASE = "phase_b"
QUERY_RELEASE = "query.phase_b_release"  # one noisy release of a site (a plain sum)
QUERY_STORE = "query.phase_b_store"  # the finished peer profiles, kept at every site
VECTOR_TASK = "phase_b_release"  # the same release as a secure-sum vector task (SecAgg+)
RUN_CONFIG_KEYS = {"phase-b-prototypes": "prototypes", "phase-b-rounds": "rounds", "phase-b-min-count": "min_count"}


@dataclass(frozen=True)
class PhaseBConfig:
    prototypes: int = 12
    rounds: int = 2  # k-means rounds: round 0 finds the centre, the others move the prototypes around it
    min_count: int = 20  # prototypes with fewer (noisy) patients are suppressed
    max_targets: int = 12  # sets the profile's clipping bound: one point with this many events passes unscaled
    seed: int = 0  # public: the initial prototypes depend only on it

    @property
    def releases(self) -> int:
        return self.rounds + 1  # the peer profile is one more release

    @classmethod
    def from_run_config(cls, run: dict) -> "PhaseBConfig":
        return cls(**{field: type(getattr(cls(), field))(run[key]) for key, field in RUN_CONFIG_KEYS.items()
                      if key in run})


def profiles_message(profiles: PeerProfiles, run_id: str) -> RecordDict:
    """The peer profiles as the coordinator sends them to every site."""
    arrays = ArrayRecord({"centroids": Array(profiles.centroids), "counts": Array(profiles.counts),
                          "rates": Array(profiles.rates), "suppressed": Array(profiles.suppressed.astype(np.float64)),
                          "centre": Array(profiles.centre)})
    meta = ConfigRecord({"run_id": run_id, "count_noise_std": profiles.count_noise_std,
                         "concepts": json.dumps(profiles.concepts), "horizon_days": profiles.horizon_days,
                         "min_count": profiles.min_count})
    return RecordDict({"arrays": arrays, "config": meta})


def profiles_from_message(content: RecordDict) -> PeerProfiles:
    a, c = content["arrays"], content["config"]
    return PeerProfiles(a["centroids"].numpy(), a["counts"].numpy(), a["rates"].numpy(),
                        a["suppressed"].numpy().astype(bool), float(c["count_noise_std"]),
                        json.loads(str(c["concepts"])), int(c["horizon_days"]), int(c["min_count"]),
                        a["centre"].numpy())
