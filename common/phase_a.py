"""Phase A's contract (what the coordinator and every site agree on): the run's settings, the message names,
and the recommender both sides build from them. Phase A trains the next-event recommender with DP-SGD at each
site and averages it (FedAvg): client/phase_a.py is a site's side, server/phase_a.py the coordinator's.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from pmlm.common.privacy.accountant import calibrate_dpsgd
from pmlm.common.privacy.budget import PHASE_A_SHARE
from pmlm.common.privacy.events import DpSgd
from pmlm.common.profiles import TaskProfile, load_profile

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord

    from pmlm.common.model import NextEventRecommender, RecommenderConfig

PHASE = "phase_a"
RECORD = "phase_a"  # phases B and C carry phase A's config under this record name: it names the run
QUERY_STORE = "query.store_model"  # the final global model, kept at every site
# A train reply's metric from a site whose policy receives phase A without training it: the reply has no weights.
RECEIVE_ONLY = "receive-only"
# The model travels as one flat array under this name. Flower sends each array of a message as objects of their
# own (the array and its chunks, each a request to the SuperLink and a row in its database): the model's five
# tensors made 14 objects a message, one array makes 6, and a deployed round's messages queued on those requests.
MODEL_ARRAY = "model"

RUN_CONFIG_KEYS = {  # run-config key -> PhaseAConfig field (the budget's keys: PhaseAConfig.from_run_config)
    "num-server-rounds": "rounds", "local-epochs": "local_epochs", "batch-size": "batch_size", "lr": "lr",
    "dp-lr": "dp_lr", "optimizer": "optimizer", "delta": "delta", "sampling-rate": "sampling_rate",
    "patient-clip": "patient_clip", "points-per-patient": "points_per_patient", "profile": "profile",
    "dim": "dim", "max-history": "max_history",
}


@dataclass
class PhaseAConfig:
    """What the coordinator decides for the run; travels in the train/evaluate ConfigRecord."""

    rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 50  # patients per step of non-private training
    sampling_rate: float = 0.5  # DP-SGD's public Poisson rate (about 50 of the sample sites' ~100 training patients)
    lr: float = 0.3  # non-private training (Adam)
    optimizer: str = "adam"  # non-private training; DP-SGD always runs plain SGD at dp_lr (client/train.py says why)
    dp_lr: float = 10.0  # DP-SGD; clipped per-patient gradients are small, so the step is large
    # What the run asks of each site; a site's own policy caps all three (client/site_policy.py). The names are
    # the run config's: `phase_a_epsilon` is phase A's share (`phase-a-epsilon`), `epsilon_total` the whole
    # budget (the run config's `epsilon`).
    phase_a_epsilon: float = 1.5  # phase A's epsilon per site (patient-level); <= 0 asks for a non-private run
    delta: float = 1e-5
    epsilon_total: float = 0.0  # the whole budget the run asks for; 0 means phase_a_epsilon / the site's phase-A share
    patient_clip: float = 0.3  # below every patient's gradient norm at the start (~0.5-3 on the sample)
    points_per_patient: int = 32
    profile: str = "obgyn"
    dim: int = 64  # the patient vector's length (phase B's embedding, phase C's state)
    max_history: int = 64
    run_name: str = "phase-a"
    # The coordinator's estimate of the DP-SGD noise multiplier a site that has spent nothing calibrates to
    # (expected_noise_multiplier): where each site's own search starts, three prices instead of eight when it is
    # right. The site's ledger decides the multiplier whatever this says (0: no estimate).
    noise_guess: float = 0.0

    @property
    def private(self) -> bool:
        return self.phase_a_epsilon > 0

    def model_config(self, profile: TaskProfile) -> RecommenderConfig:
        from pmlm.common.model import recommender_config  # torch: see new_model

        return recommender_config(profile, dim=self.dim, max_history=self.max_history)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_run_config(cls, run: dict) -> "PhaseAConfig":
        """The settings a run config asks for. `epsilon` is each site's whole budget and `phase-a-epsilon` phase
        A's share of it (default: PHASE_A_SHARE of it; 0 asks for a non-private run). The old spelling still
        reads as it did: with `epsilon-total` given, that is the whole budget and `epsilon` phase A's share."""
        given = {field: run[key] for key, field in RUN_CONFIG_KEYS.items() if key in run}
        if "epsilon-total" in run and "phase-a-epsilon" not in run:
            whole, phase_a = run["epsilon-total"], run.get("epsilon")
        else:
            whole, phase_a = run.get("epsilon"), run.get("phase-a-epsilon")
        if whole:  # none or 0: the site derives it (phase A's epsilon / its policy's share)
            given["epsilon_total"] = float(whole)
            phase_a = float(whole) * PHASE_A_SHARE if phase_a is None else phase_a
        if phase_a is not None:
            given["phase_a_epsilon"] = float(phase_a)
        return cls.from_record(given)

    @classmethod
    def from_record(cls, record) -> "PhaseAConfig":
        names = {f.name: f.type for f in fields(cls)}
        values = {k: record[k] for k in names if k in record}
        if "epsilon" in record and "phase_a_epsilon" not in record:  # a coordinator from before the rename
            values["phase_a_epsilon"] = record["epsilon"]
        return cls(**values)


def dp_plan(sampling_rate: float, epochs: int) -> tuple[float, int]:
    """(sampling rate, steps) of `epochs` local epochs of Poisson sampling at `sampling_rate`.

    Both come from public numbers only, never from the site's patient count: under add/remove-one
    adjacency a rate or a step count that depends on N would publish N (and break the stated epsilon).
    An epoch is 1/rate steps (the rate's inverse is rounded to a whole number of steps)."""
    per_epoch = max(1, round(1.0 / sampling_rate))
    return 1.0 / per_epoch, epochs * per_epoch


def planned_releases(cfg: PhaseAConfig, noise_multiplier: float) -> list[DpSgd]:
    """The run's DP-SGD releases at one site, in order, at `noise_multiplier`: one per round."""
    q, steps = dp_plan(cfg.sampling_rate, cfg.local_epochs)
    return [DpSgd(noise_multiplier, q, steps, cfg.patient_clip)] * cfg.rounds


def expected_noise_multiplier(cfg: PhaseAConfig) -> float:
    """The noise multiplier a site that has spent nothing, with a policy that allows the run, calibrates to: the
    run's phase-A cap over its planned releases, whose rounds the site's search merges into one run of steps (the
    same search and accountant settings as the site's ledger). A site with a history or a lower cap finds its own;
    public numbers only. 0 for a non-private run."""
    if not cfg.private:
        return 0.0
    q, steps = dp_plan(cfg.sampling_rate, cfg.local_epochs)
    return calibrate_dpsgd(cfg.phase_a_epsilon, cfg.delta, q, steps * cfg.rounds)


def new_model(cfg: PhaseAConfig, profile: TaskProfile) -> NextEventRecommender:
    # The model module imports torch (2-5 s). Every message of phases B and C carries this config, and under the
    # Deployment Engine each message starts a fresh ClientApp process: most of them never build a model.
    from pmlm.common.model import NextEventRecommender

    return NextEventRecommender(cfg.model_config(profile))


def pack_model(weights: dict[str, torch.Tensor], cfg: PhaseAConfig) -> ArrayRecord:
    """The model's tensors as one flat float32 array (see MODEL_ARRAY), in the order of the layout both sides build
    from the run's config: tensors of other names or shapes are refused rather than packed out of place."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    layout = _layout(cfg)
    if [(k, tuple(t.shape)) for k, t in weights.items()] != list(layout):
        raise ValueError(f"these weights are not phase A's model for this run's config: got "
                         f"{ {k: tuple(t.shape) for k, t in weights.items()} }, expected {dict(layout)}")
    flat = np.concatenate([t.detach().cpu().numpy().astype(np.float32, copy=False).ravel() for t in weights.values()])
    return ArrayRecord({MODEL_ARRAY: Array(flat)})


def unpack_model(record: ArrayRecord, cfg: PhaseAConfig) -> dict[str, torch.Tensor]:
    """The state dict a packed model holds; its layout is the one both sides build from the run's config."""
    import math

    import torch

    if list(record) != [MODEL_ARRAY]:
        raise ValueError(f"phase A's model arrives as one array {MODEL_ARRAY!r}, got arrays {sorted(record)}")
    flat = torch.from_numpy(record[MODEL_ARRAY].numpy().astype("float32", copy=True))
    layout = _layout(cfg)
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.ndim != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"phase A's model has {sum(sizes)} values for this run's config, the array holds "
                         f"{flat.numel()} in shape {tuple(flat.shape)}")
    return {name: part.view(shape).clone() for (name, shape), part in zip(layout, flat.split(sizes))}


def _layout(cfg: PhaseAConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of each of the model's tensors, in state-dict order."""
    return _layout_of(cfg.model_config(load_profile(cfg.profile)))


@functools.lru_cache(maxsize=8)
def _layout_of(model_config: RecommenderConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Built once per model config: every phase-A message unpacks, and every train reply packs, a model.
    from pmlm.common.model import NextEventRecommender

    return tuple((k, tuple(t.shape)) for k, t in NextEventRecommender(model_config).state_dict().items())
