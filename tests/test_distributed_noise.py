"""Noise shared across a secure sum (a site's `noise = "distributed"` policy): each site adds σ/√k, only after it
saw in SecAgg+'s key exchange at least k sites and a reconstruction threshold of at least k; its ledger records
the ε it relies on (σ, enforced) and the worst case of its own noise alone, and verification re-prices both."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from pmlm.client import client_app as site_app
from pmlm.client.examples import Example
from pmlm.client.phase_b import PhaseBSite
from pmlm.client.secure_sum import attach_secure_sum, secure_sum_key_exchange, vector_task
from pmlm.client.site_policy import PolicyError, PolicyRefusal, SitePolicy
from pmlm.common.phase_b import VECTOR_TASK as PHASE_B_TASK
from pmlm.common.phase_b import PhaseBConfig
from pmlm.common.peer_profiles import initial_centroids
from pmlm.common.privacy import AccountantSettings, BudgetConfig, GaussianRelease, SiteLedger, compose_epsilon, verify_ledger
from pmlm.common.privacy.kept import GroupChanged
from pmlm.common.privacy.shared_noise import SITE_NOISE, KeyExchange, NoiseSharing
from pmlm.common.privacy.signing import SITE_ENTRY_DOMAIN, canonical_json, line_hash, load_or_create_private_key, sign
from pmlm.server.in_process import RUN_ID, InProcessGrid
from pmlm.server.roster import SiteRoster
from pmlm.server.secure_sum import SecureSumFailed, secure_sum, secure_sum_over

DELTA = 1e-5
FAST = AccountantSettings(pld_value_discretization_interval=1e-2)
BUDGET = BudgetConfig(20.0, DELTA, {"phase_a": 0.4, "phase_b": 0.6})
DISTRIBUTED = {"noise": "distributed", "min_sites": 3}


# -- the policy -------------------------------------------------------------------------------------------

def test_policy_reads_the_noise_setting_from_site_json_and_node_config(tmp_path):
    (tmp_path / "site.json").write_text(json.dumps({"privacy": DISTRIBUTED}))
    assert SitePolicy.load(tmp_path).min_sites == 3
    node = SitePolicy.load(None, {"policy-noise": "distributed", "policy-min-sites": "4"})
    assert (node.noise, node.min_sites) == ("distributed", 4)
    assert SitePolicy().noise == "site" and SitePolicy().noise_sharing(None) is SITE_NOISE


@pytest.mark.parametrize("raw, message", [
    ({"noise": "shared"}, "noise must be one of"),
    ({"noise": "distributed"}, "needs min_sites"),
    ({"noise": "distributed", "min_sites": 1}, "needs min_sites"),
    ({"noise": "distributed", "min_sites": True}, "needs min_sites"),
    ({"noise": "distributed", "min_sites": 3, "secure_sum_only": False}, "needs secure_sum_only"),
    ({"min_sites": 3}, "applies only to noise 'distributed'"),
])
def test_malformed_noise_policies_are_operator_errors(raw, message):
    with pytest.raises(PolicyError, match=message):
        SitePolicy.from_dict(raw)


def test_the_site_checks_the_key_exchange_it_saw_before_sharing_its_noise():
    policy = SitePolicy.from_dict(DISTRIBUTED)
    with pytest.raises(PolicyRefusal) as plain:
        policy.noise_sharing(None)
    assert plain.value.limit == "noise"
    with pytest.raises(PolicyRefusal, match="only 2 sites") as small:
        policy.noise_sharing(KeyExchange((7, 9), 2))
    assert small.value.limit == "min_sites"
    with pytest.raises(PolicyRefusal, match="threshold is 2"):
        policy.noise_sharing(KeyExchange((1, 2, 3, 4, 5), 2))  # the coordinator with 2 sites' shares unmasks it
    assert policy.noise_sharing(KeyExchange((1, 2, 3, 4, 5), 3)) == NoiseSharing(3, 5, 3)


# -- the noise actually drawn -----------------------------------------------------------------------------

def _phase_b_site(tmp_path, name: str) -> PhaseBSite:
    rng = np.random.default_rng(0)
    examples = [Example(f"p{i}", None, "c", [], [], [], "train") for i in range(40)]
    site = PhaseBSite(SiteLedger(tmp_path / name, name, BUDGET, settings=FAST), examples,
                      rng.standard_normal((40, 32)), ["c"], PhaseBConfig(prototypes=40), run_id="r",
                      rng=np.random.default_rng(1))
    site._sigma = 3.0  # no calibration: the test is about the noise drawn for a given σ
    return site


@pytest.mark.parametrize("sharing", [SITE_NOISE, NoiseSharing(4, 5, 4)])
def test_a_site_draws_sigma_over_root_k_and_says_so(tmp_path, sharing):
    site = _phase_b_site(tmp_path, f"s{sharing.min_sites}")
    centroids = initial_centroids(40, 32, 0)
    out = site.release("kmeans", centroids, 0, None, noise=sharing)
    noise = out.values - site.stats("kmeans", centroids, None)
    expected = 3.0 * site.bound("kmeans") / math.sqrt(sharing.min_sites)
    assert out.noise_std == pytest.approx(expected)
    assert np.std(noise) == pytest.approx(expected, rel=0.05)  # 1,320 draws
    assert out.entry["mechanism"]["noise_multiplier"] == 3.0  # the ledger prices the full σ either way


# -- the ledger's two figures -----------------------------------------------------------------------------

def test_the_ledger_records_the_relied_on_and_the_worst_case_epsilon(tmp_path):
    ledger = SiteLedger(tmp_path / "s", "s", BUDGET, settings=FAST)
    ledger.record("phase_b", GaussianRelease(2.0, 1.0), round=0)  # before sharing: own noise = relied on
    shared = ledger.record("phase_b", GaussianRelease(2.0, 1.0), round=1, noise=NoiseSharing(4, 6, 4))
    after = ledger.record("phase_b", GaussianRelease(2.0, 1.0), round=2)

    noise = shared["noise"]
    assert (noise["mode"], noise["min_sites"], noise["site_noise_multiplier"]) == ("distributed", 4, 1.0)
    assert noise["key_exchange"] == {"sites": 6, "threshold": 4} and "collude" in noise["trust_assumption"]
    relied = compose_epsilon([GaussianRelease(2.0, 1.0)] * 2, DELTA, FAST).pld
    worst = compose_epsilon([GaussianRelease(2.0, 1.0), GaussianRelease(1.0, 1.0)], DELTA, FAST).pld
    assert shared["epsilon"] == pytest.approx(relied) and noise["worst_case_epsilon"] == pytest.approx(worst)
    assert noise["worst_case_epsilon"] > 1.5 * shared["epsilon"]
    assert "noise" not in after  # its own noise is the full σ; the replay still composes it into the worst case

    replay = verify_ledger(ledger.path)
    assert replay.ok, replay.problems
    later = compose_epsilon([GaussianRelease(2.0, 1.0), GaussianRelease(1.0, 1.0), GaussianRelease(2.0, 1.0)],
                            DELTA, FAST).pld
    assert replay.worst_case_epsilon("patient-in-site") == pytest.approx(later)
    assert replay.worst_case_epsilon("site") is None


def _rewritten(ledger: SiteLedger, index: int, change) -> list:
    """The ledger's problems after entry `index` is changed and the chain re-signed with the site's own key:
    only the re-pricing can catch it."""
    key = load_or_create_private_key(ledger.key_path)
    out, prev = [], None
    for i, line in enumerate(ledger.path.read_bytes().split(b"\n")[:-1]):
        entry = json.loads(line)
        if i == index:
            change(entry)
        entry.pop("signature")
        entry["prev_hash"] = prev or entry["prev_hash"]
        entry["signature"] = sign(key, SITE_ENTRY_DOMAIN, canonical_json(entry))
        out.append(canonical_json(entry))
        prev = line_hash(out[-1])
    ledger.path.write_bytes(b"".join(line + b"\n" for line in out))
    return verify_ledger(ledger.path, key.public_key()).problems


@pytest.mark.parametrize("change, message", [
    (lambda e: e["noise"].update(site_noise_multiplier=2.0), "is not the mechanism's"),
    (lambda e: e["noise"].update(min_sites=9), "does not carry min_sites=9"),
    (lambda e: e["noise"].update(mode="site"), "only 'distributed'"),
    (lambda e: e["noise"].update(worst_case_epsilon=0.5), "own noise alone gives"),
    (lambda e: e["noise"].pop("trust_assumption"), "exactly the fields"),
])
def test_verification_rejects_a_noise_block_that_does_not_match_its_mode(tmp_path, change, message):
    ledger = SiteLedger(tmp_path / "s", "s", BUDGET, settings=FAST)
    ledger.record("phase_b", GaussianRelease(2.0, 1.0), round=0, noise=NoiseSharing(4, 4, 4))
    problems = _rewritten(ledger, 1, change)
    assert problems and problems[0].line == 2 and message in problems[0].message, problems


def test_the_audit_report_shows_both_figures(tmp_path):
    from pmlm.reports.audit import AuditedLedger, summary

    ledger = SiteLedger(tmp_path / "s", "s", BUDGET, settings=FAST)
    entry = ledger.record("phase_b", GaussianRelease(2.0, 1.0), round=0, noise=NoiseSharing(4, 4, 4))
    audited = AuditedLedger(ledger.path, "site ledger", verify_ledger(ledger.path))
    figures = summary(audited)
    assert figures["epsilon"] == pytest.approx(entry["epsilon"])
    assert figures["worst_case_epsilon"] == pytest.approx(entry["noise"]["worst_case_epsilon"])
    assert f"ε = {entry['noise']['worst_case_epsilon']:.4g}" in audited.shared_noise("patient-in-site")


# -- through Flower's SecAgg+ -----------------------------------------------------------------------------

SIGMA, LENGTH = 1.0, 4000
probe_app = ClientApp()
attach_secure_sum(probe_app)


@vector_task("test_shared_noise_probe")
def shared_noise_probe(config: dict, context: Context, arrays: dict):
    """Pure noise at the share the site's own policy allows for the key exchange it saw."""
    sharing = SitePolicy.load(None, context.node_config).noise_sharing(secure_sum_key_exchange())
    std = sharing.own_stddev(GaussianRelease(SIGMA, 1.0))
    return np.random.default_rng(context.node_id).normal(0.0, std, LENGTH), {"sites": sharing.sites,
                                                                             "threshold": sharing.threshold}


def _grid(app: ClientApp, node_configs: list[dict]) -> tuple[InProcessGrid, Context]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    grid = InProcessGrid(app, node_configs, run_config={})
    return grid, Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})


def test_secagg_sum_of_sites_sharing_noise_carries_the_full_sigma():
    policy = {"policy-noise": "distributed", "policy-min-sites": 3}
    grid, context = _grid(probe_app, [policy] * 4)
    nodes = sorted(grid.get_node_ids())
    result = secure_sum(grid, context, "test_shared_noise_probe", {}, nodes, shape=(LENGTH,), timeout=30,
                        clipping_range=16.0)  # default threshold for 4 sites: 3
    assert result.metrics == {n: {"sites": 4, "threshold": 3} for n in nodes}
    assert np.std(result.total) == pytest.approx(SIGMA * math.sqrt(4 / 3), rel=0.05)  # >= σ, far below 2σ


def test_a_coordinator_that_asks_for_a_threshold_of_k_gets_the_sum_of_sites_sharing_with_k():
    """Three sites sharing their noise with 3 (the default threshold, 2 of 3, is refused: the next test): the run
    config's secure-sum-threshold reaches SecAgg+ through the phases' sum (secure_sum_over) and 3 is accepted."""
    grid, _ = _grid(probe_app, [{"policy-noise": "distributed", "policy-min-sites": 3}] * 3)
    nodes = sorted(grid.get_node_ids())
    result = secure_sum_over(SiteRoster(nodes), grid, "phase_b", 0, "test_shared_noise_probe", {}, shape=(LENGTH,),
                             timeout=30, clipping_range=16.0, threshold=3)
    assert result.metrics == {n: {"sites": 3, "threshold": 3} for n in nodes}


def test_under_a_sparse_graph_a_site_counts_only_the_sites_it_shared_with():
    """Nine sites, each sharing its secrets with 5 (itself included): a site sharing its noise with 3 sees a key
    exchange of 5 and takes part. One sharing with 6 refuses, although 9 sites are in the sum: only 5 hold shares
    of its secrets, and the coordinator's count of the sum's sites is not what protects it."""
    grid, context = _grid(probe_app, [{"policy-noise": "distributed", "policy-min-sites": 3}] * 9)
    nodes = sorted(grid.get_node_ids())
    result = secure_sum(grid, context, "test_shared_noise_probe", {}, nodes, shape=(LENGTH,), timeout=30,
                        clipping_range=16.0, reconstruction_threshold=3, neighbours=5)
    assert result.sites == nodes and result.metrics == {n: {"sites": 5, "threshold": 3} for n in nodes}

    grid, context = _grid(probe_app, [{"policy-noise": "distributed", "policy-min-sites": 6}] * 9)
    with pytest.raises(SecureSumFailed, match="only 5 sites"):
        secure_sum(grid, context, "test_shared_noise_probe", {}, sorted(grid.get_node_ids()), shape=(LENGTH,),
                   timeout=30, clipping_range=16.0, neighbours=5)


def test_sites_refuse_a_threshold_below_min_sites_and_record_it(tmp_path):
    """The project's own ClientApp: three sites with min_sites 3 under the default threshold of 2 all refuse
    before computing anything, each with a policy_refusal line in its own ledger."""
    configs = [{"data-dir": str(tmp_path / f"data{i}"), "site-dir": str(tmp_path / f"site{i}"), "site-id": f"h{i}",
                "policy-noise": "distributed", "policy-min-sites": 3} for i in range(3)]
    grid, context = _grid(site_app.app, configs)
    with pytest.raises(SecureSumFailed, match="threshold is 2"):
        secure_sum(grid, context, PHASE_B_TASK, {"round": 0}, sorted(grid.get_node_ids()), shape=(2, 3),
                   timeout=30)
    for i in range(3):
        refusal = SiteLedger(tmp_path / f"site{i}", f"h{i}").entries()[-1]
        assert (refusal["kind"], refusal["limit"], refusal["phase"]) == ("policy_refusal", "min_sites", "phase_b")


def test_a_kept_release_with_shared_noise_is_never_resent_unmasked(tmp_path):
    site = _phase_b_site(tmp_path, "kept")
    centroids = initial_centroids(40, 32, 0)
    first = site.release("kmeans", centroids, 0, None, group=(1, 2, 3, 4), noise=NoiseSharing(4, 4, 4))
    again = site.release("kmeans", centroids, 0, None, group=(1, 2, 3, 4), noise=NoiseSharing(4, 4, 4))
    assert np.array_equal(first.values, again.values)  # a retried secure sum gets the kept release
    with pytest.raises(GroupChanged, match="never re-sent unmasked"):
        site.release("kmeans", centroids, 0, None, other_group_allowed=True)


def test_the_coordinator_counts_each_sites_own_share_of_shared_noise(tmp_path):
    """The noise of a sum is what the sites drew: four sites sharing σ = 2 (σ/2 each) put σ = 2 in the sum, not 4,
    so the peer profiles' suppression and shrinkage are not set for noise that is not there."""
    from pmlm.server.prototypes import summed_noise_std

    def entries(sharing):
        return [SiteLedger(tmp_path / f"{sharing.min_sites}-{i}", f"site-{i}", BUDGET)
                .record("phase_b", GaussianRelease(2.0, 1.5), round=1, noise=sharing) for i in range(4)]

    assert summed_noise_std(entries(NoiseSharing(4, 4, 4))) == pytest.approx(2.0 * 1.5)
    assert summed_noise_std(entries(SITE_NOISE)) == pytest.approx(4.0 * 1.5)
