"""A hostile coordinator against the real ClientApp: each request outside the site's own policy is refused with a
reply that names the limit, a signed `policy_refusal` line in the site's ledger, and nothing released.

Three small sites of the bundled sample run phases A and B honestly first (in-process, SecAgg+ for B), so each
has a ledger, a global model, peer profiles and a coordinator anchor; then the coordinator turns hostile.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pmlm.client.client_app import app as client_app
from pmlm.client.examples import Example
from pmlm.common.phase_a import PhaseAConfig, new_model, pack_model
from pmlm.client.phase_c import sampled_points
from pmlm.client.reward import ConceptMatcher
from pmlm.client.rl import LocalRL, RLConfig
from pmlm.client.sampling import keyed_seed, site_sampling_key
from pmlm.client.site_policy import PolicyError, SitePolicy
from pmlm.common.assemble.policy import PolicyState, PromptPolicy
from pmlm.common.privacy import SiteLedger
from pmlm.common.privacy.ledger import LedgerError, verify_ledger
from pmlm.common.profiles import load_profile
from pmlm.common.assemble.render import PatientContext
from pmlm.server.in_process import RUN_ID, InProcessGrid, run_in_process
from pmlm.server.secure_sum import SecureSumFailed, secure_sum
from pmlm.server.server_app import app as server_app

SITES = ("hospital_a", "hospital_b", "hospital_c")
HONEST = {"num-server-rounds": 1, "local-epochs": 1, "epsilon": 3.0, "phase-a-epsilon": 1.5, "delta": 1e-5,
          "dim": 16, "max-history": 16, "points-per-patient": 4, "evaluate-each-round": False, "min-nodes": 3,
          "phases": "ab", "phase-b-rounds": 1, "phase-b-prototypes": 3, "phase-b-min-count": 5}


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory):
    from pmlm.deploy.local import quick_slice

    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    root = tmp_path_factory.mktemp("hostile")
    data = quick_slice({s: sample / s for s in SITES}, root / "data", patients=30)
    work = root / "work"
    nodes = [{"data-dir": str(data[s]), "site-id": s, "site-dir": str(work / "sites" / s)} for s in SITES]
    torch.manual_seed(0)
    grid, context = run_in_process(server_app, client_app, nodes, {**HONEST, "workdir": str(work)})
    run_name = json.loads(context.state["phase-a-result"]["json"])["run"]
    return {"nodes": nodes, "work": work, "run": run_name, "grid": grid}


def ask(node: dict, message_type: str, records: dict) -> Message:
    """Deliver one message to the site as its SuperNode would, and return what it sends back."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    grid = InProcessGrid(client_app, [node], {})
    message = Message(content=RecordDict(records), dst_node_id=1000, message_type=message_type)
    return grid.handle(1000, grid._deliver(message))


def ledger_lines(node: dict) -> list[dict]:
    path = Path(node["site-dir"]) / "ledger" / "privacy_ledger.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def egress_lines(node: dict) -> int:
    path = Path(node["site-dir"]) / "egress.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def phase_a_config(**asked) -> dict:
    cfg = PhaseAConfig(rounds=1, local_epochs=1, dim=16, max_history=16, points_per_patient=4,
                       run_name=asked.pop("run_name", "phase-a-hostile"))
    return {**cfg.to_record(), **asked}


def weights() -> ArrayRecord:
    cfg = PhaseAConfig(dim=16, max_history=16)
    return pack_model(new_model(cfg, load_profile("obgyn")).state_dict(), cfg)


def refused(node: dict, reply: Message, limit: str) -> dict:
    """The reply is an error naming `limit`, and the ledger's newest line is the signed refusal of it."""
    assert reply.has_error(), "the site answered a request outside its policy"
    assert "PolicyRefusal" in reply.error.reason and f"({limit})" in reply.error.reason, reply.error.reason
    last = ledger_lines(node)[-1]
    assert last["kind"] == "policy_refusal" and last["limit"] == limit
    assert verify_ledger(Path(node["site-dir"]) / "ledger" / "privacy_ledger.jsonl").ok
    return last


@pytest.mark.parametrize("asked, limit", [
    ({"phase_a_epsilon": 0.0}, "allow_non_private"),  # DP switched off: once trained with Adam and sent raw weights
    ({"phase_a_epsilon": -1.0}, "allow_non_private"),
    ({"phase_a_epsilon": 500.0, "epsilon_total": 1000.0}, "epsilon_total"),  # a budget of 1000
    ({"phase_a_epsilon": 1.5, "epsilon_total": 3.0, "delta": 0.5}, "delta"),  # delta 0.5
    ({"phase_a_epsilon": 2.5, "epsilon_total": 3.0}, "phase_a"),  # more than the site's phase-A cap (1.5 of 3)
    ({"run_name": "../../../tmp/pmlm-escape"}, "run_id"),  # a run id that would become a path
])
def test_phase_a_requests_outside_the_policy_are_refused_before_training(honest_run, asked, limit, tmp_path):
    node = honest_run["nodes"][0]
    before = ledger_lines(node)
    sent_before = egress_lines(node)
    config = ConfigRecord({**phase_a_config(**asked), "server-round": 1})
    reply = ask(node, MessageType.TRAIN, {"arrays": weights(), "config": config})
    line = refused(node, reply, limit)
    after = ledger_lines(node)
    assert len(after) == len(before) + 1  # the refusal only: nothing priced, trained or charged
    assert [e for e in after if e["kind"] == "release"] == [e for e in before if e["kind"] == "release"]
    assert line["request"]["message_type"] == "train"
    assert egress_lines(node) == sent_before + 1  # the error reply is all that left, and it is logged
    assert not Path("/tmp/pmlm-escape").exists()
    assert not any(Path(node["site-dir"]).glob("phase_a/plan-phase-a-hostile*"))


def test_asking_for_less_than_the_policy_is_answered_with_less(honest_run, tmp_path):
    """The coordinator can ask for less: a phase-A epsilon of 0.3 is calibrated to 0.3, not to the site's cap."""
    node = {**honest_run["nodes"][1], "site-dir": str(tmp_path / "fresh_b")}
    config = ConfigRecord({**phase_a_config(phase_a_epsilon=0.3, epsilon_total=3.0, run_name="phase-a-modest"),
                           "server-round": 1})
    reply = ask(node, MessageType.TRAIN, {"arrays": weights(), "config": config})
    assert not reply.has_error(), reply.error
    release = [e for e in ledger_lines(node) if e["kind"] == "release"][-1]
    assert 0.2 < release["phase_epsilon"] <= 0.3 + 1e-9
    assert release["population_size"] is None  # the site's size is not public under the default policy
    assert reply.content["metrics"]["num-examples"] == 1.0


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_evaluation_is_a_query_the_site_does_not_answer_by_default(honest_run, split):
    node = honest_run["nodes"][0]
    config = ConfigRecord({**phase_a_config(run_name=honest_run["run"]), "split": split})
    reply = ask(node, MessageType.EVALUATE, {"arrays": weights(), "config": config})
    refused(node, reply, "answer_evaluate")


def test_a_site_that_answers_evaluations_still_never_scores_its_training_split(honest_run):
    node = {**honest_run["nodes"][0], "policy-answer-evaluate": True}
    config = ConfigRecord({**phase_a_config(run_name=honest_run["run"]), "split": "train"})
    refused(node, ask(node, MessageType.EVALUATE, {"arrays": weights(), "config": config}), "answer_evaluate")
    config = ConfigRecord({**phase_a_config(run_name=honest_run["run"]), "split": "val"})
    reply = ask(node, MessageType.EVALUATE, {"arrays": weights(), "config": config})
    assert not reply.has_error() and "recall@5" in reply.content["metrics"]


def test_plain_releases_are_refused_where_the_policy_wants_secure_aggregation(honest_run):
    node = honest_run["nodes"][0]
    phase_a = ConfigRecord(phase_a_config(run_name=honest_run["run"]))
    centroids = np.eye(3, 16)
    arrays = ArrayRecord({"centroids": _array(centroids), "centre": _array(np.zeros(16))})
    config = ConfigRecord({"run_id": honest_run["run"], "plan": json.dumps({"prototypes": 3}), "kind": "kmeans",
                           "round": 7})
    reply = ask(node, "query.phase_b_release", {"arrays": arrays, "config": config, "phase_a": phase_a})
    refused(node, reply, "secure_sum_only")
    reply = ask(node, "query.pmlm_plain_sum", {"config": ConfigRecord({"pmlm-sum.meta": "{}"})})
    refused(node, reply, "secure_sum_only")
    reply = ask(node, "query.phase_c_round", {"arrays": ArrayRecord(), "config": config, "phase_a": phase_a})
    refused(node, reply, "secure_sum_only")


def _array(values: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(values, dtype=np.float64))


def test_a_kept_release_is_not_resent_to_a_smaller_secure_sum_group(honest_run):
    """Round 0 of a phase-B run summed under SecAgg+ by three sites; the coordinator asks the same round again with
    two of them, to subtract the totals. Each refuses unless its own policy accepts per-site DP alone."""
    nodes = [dict(n) for n in honest_run["nodes"]]
    grid = InProcessGrid(client_app, nodes, {})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    ids = sorted(grid.get_node_ids())
    phase_a = phase_a_config(run_name=honest_run["run"])
    run_b = "phase-b-hostile-retry"
    config = {**phase_a, "run_id": run_b, "plan": json.dumps({"prototypes": 1, "rounds": 1}), "kind": "centre",
              "round": 0}
    arrays = {"centroids": np.zeros((1, 16)), "centre": np.zeros(16)}
    first = secure_sum(grid, None, "phase_b_release", config, ids, shape=(1, 17), arrays=arrays, timeout=30,
                       clipping_range=8192.0)
    assert sorted(first.sites) == ids
    with pytest.raises(SecureSumFailed) as failed:
        secure_sum(grid, None, "phase_b_release", config, ids[:2], shape=(1, 17), arrays=arrays, timeout=30,
                   clipping_range=8192.0)
    assert str(failed.value).count("smaller_group_retry refused") == 2  # the round fails and says why
    for node in nodes[:2]:
        assert ledger_lines(node)[-1]["kind"] == "policy_refusal"
        assert ledger_lines(node)[-1]["limit"] == "smaller_group_retry"
        assert sum(1 for e in ledger_lines(node) if e.get("run_id") == run_b and e["kind"] == "release") == 1
    # The same group again is a plain resend of the kept release (nothing new drawn or charged) ...
    again = secure_sum(grid, None, "phase_b_release", config, ids, shape=(1, 17), arrays=arrays, timeout=30,
                       clipping_range=8192.0)
    assert np.allclose(again.total, first.total, atol=2 * first.quantization_bound)
    # ... and a site whose policy accepts per-site DP alone resends to the smaller group.
    for node in nodes:
        node["policy-smaller-group-retry"] = True
    lenient = InProcessGrid(client_app, nodes, {})
    smaller = secure_sum(lenient, None, "phase_b_release", config, sorted(lenient.get_node_ids())[:2], shape=(1, 17),
                         arrays=arrays, timeout=30, clipping_range=8192.0)
    assert len(smaller.sites) == 2
    for node in nodes:
        assert sum(1 for e in ledger_lines(node) if e.get("run_id") == run_b and e["kind"] == "release") == 1


def test_ledger_queries_carry_release_metadata_only(honest_run):
    """A coordinator that re-asks for the whole ledger gets the signed entries again, and nothing else."""
    node = honest_run["nodes"][0]
    phase_a = ConfigRecord(phase_a_config(run_name=honest_run["run"]))
    reply = ask(node, "query.ledger_entries", {"config": ConfigRecord({"held": json.dumps({})}), "phase_a": phase_a})
    assert not reply.has_error(), reply.error
    assert set(reply.content) == {"config"} and set(reply.content["config"]) == {"site_id", "entries"}
    entries = json.loads(str(reply.content["config"]["entries"]))
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    assert all(e.get("population_size") is None for e in entries if e["kind"] == "release")


def test_a_deleted_ledger_is_not_restarted_while_the_site_key_exists(honest_run, tmp_path):
    node = honest_run["nodes"][2]
    copy = tmp_path / "site_c"
    shutil.copytree(node["site-dir"], copy)
    (copy / "ledger" / "privacy_ledger.jsonl").unlink()  # a fresh ledger would come with a fresh budget
    node = {**node, "site-dir": str(copy)}
    config = ConfigRecord({**phase_a_config(run_name="phase-a-after-reset"), "server-round": 1})
    reply = ask(node, MessageType.TRAIN, {"arrays": weights(), "config": config})
    assert reply.has_error() and "LedgerMissing" in reply.error.reason
    assert not (copy / "ledger" / "privacy_ledger.jsonl").exists()
    with pytest.raises(LedgerError):
        SiteLedger(copy, "hospital_c", SitePolicy().budget())


def test_a_truncated_ledger_fails_verification_against_the_coordinators_anchor(honest_run, tmp_path, capsys):
    from pmlm.cli import main

    node = honest_run["nodes"][1]
    copy = tmp_path / "site_b"
    shutil.copytree(node["site-dir"], copy)
    ledger = copy / "ledger" / "privacy_ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:2]))  # all but the first release gone: less epsilon shown as spent
    anchors = honest_run["work"] / "coordinator"
    assert main(["audit", "verify", str(copy), "--anchors", str(anchors)]) != 0
    assert "missing" in capsys.readouterr().out.lower()
    assert main(["audit", "verify", str(node["site-dir"]), "--anchors", str(anchors)]) == 0


def test_the_sites_own_policy_comes_from_its_config_never_the_run(tmp_path):
    (tmp_path / "site.json").write_text(json.dumps({"site_id": "s", "data_dir": ".",
                                                    "privacy": {"epsilon_total": 2.0, "answer_evaluate": True}}))
    policy = SitePolicy.load(tmp_path, {"policy-delta": "1e-6", "epsilon": 100, "policy-secure-sum-only": "false"})
    assert (policy.epsilon_total, policy.delta, policy.answer_evaluate, policy.secure_sum_only) == (2.0, 1e-6, True,
                                                                                                   False)
    assert SitePolicy.load(tmp_path / "nowhere") == SitePolicy()  # defaults: epsilon 3, everything closed
    with pytest.raises(PolicyError, match="unknown privacy policy keys"):
        SitePolicy.load(tmp_path, {"policy-epsilon": 8})
    with pytest.raises(PolicyError):
        SitePolicy(epsilon_total=-1.0)


# -- phase C: who takes part depends on nobody else ------------------------------------------------------

class _Assembler:
    """Stands in for the prompt assembler: a state per example, from the example alone."""

    def context(self, example: Example, _):
        rng = np.random.default_rng(abs(hash(example.patient_id)) % 2**32)
        state = PolicyState(rng.standard_normal(8).astype(np.float32), top1_prob=0.8, history_length=30)
        return PatientContext(predictions=[("prenatal visit", 0.9), ("fetal anatomy study", 0.7)]), state


def _examples(patients: list[str]) -> list[Example]:
    out = []
    for p in patients:
        for k in range(3):  # three points each: which one takes part must not depend on the others either
            out.append(Example(p, None, "snomed:424619006", [], ["snomed:424619006", f"snomed:27144200{k}"], [],
                               "train"))
    return out


class _EchoLLM:
    def chat(self, messages, **sampling):
        class Answer:
            text = "\n".join(m["content"] for m in messages)[-400:]
            cached = False
        return Answer()


def test_adding_one_patient_leaves_every_other_patients_part_in_phase_c_unchanged(tmp_path):
    key = site_sampling_key(tmp_path)
    assert (tmp_path / "keys" / "sampling.key").stat().st_mode & 0o777 == 0o600
    others = [f"patient-{i:03d}" for i in range(80)]
    with_her = others + ["patient-newcomer"]
    policy = PromptPolicy(8)  # the global policy of the round: the same for both sites

    def contributions(patients: list[str]) -> dict[str, tuple]:
        points = sampled_points(_Assembler(), _examples(patients), key, 0.3, "run-x", 0)
        random.shuffle(points)  # the order she is visited in must not matter either
        rl = LocalRL(policy, _EchoLLM(), ConceptMatcher(load_profile()), points,
                     RLConfig(use_reward_model=False, clip=0.5))
        rl.draw_seed = lambda point: keyed_seed(key, "draws", "run-x", 0, point.example.patient_id)
        episodes = rl.run_episodes(len(points))
        grads = dict(zip(sorted({e.patient_id for e in episodes}, key=[e.patient_id for e in episodes].index),
                         rl.patient_gradients(episodes)))
        chosen = {pt.example.patient_id: pt.example.targets[1] for pt in points}
        return {p: (chosen[p], grads[p].numpy().round(6).tobytes()) for p in grads}

    without, with_ = contributions(others), contributions(with_her)
    assert 10 < len(without) < 40  # Poisson at 0.3 of 80
    assert set(with_) - set(without) <= {"patient-newcomer"}
    assert all(with_[p] == without[p] for p in without)  # same point, same prompts, the same gradient
    # The sample is the site's secret: another key picks other patients.
    other_key = site_sampling_key(tmp_path / "elsewhere")
    picked = {pt.example.patient_id for pt in sampled_points(_Assembler(), _examples(others), key, 0.3, "run-x", 0)}
    picked_elsewhere = {pt.example.patient_id
                        for pt in sampled_points(_Assembler(), _examples(others), other_key, 0.3, "run-x", 0)}
    assert picked != picked_elsewhere


def test_phase_c_is_charged_as_poisson_sampling_at_the_public_rate(tmp_path):
    from pmlm.client.phase_c import SitePhaseC
    from pmlm.common.phase_c import PhaseCConfig

    mechanism = SitePhaseC.mechanism(type("S", (), {"config": PhaseCConfig(sampling_rate=0.2, clip=0.7)})(), 3.0)
    assert (mechanism.kind, mechanism.sampling_rate, mechanism.steps, mechanism.clipping_norm) == ("dp-sgd", 0.2, 1,
                                                                                                    0.7)
