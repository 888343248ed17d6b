"""Secure sum: SecAgg+ totals equal the sum of the site vectors within the quantisation bound, the coordinator
never receives one site's vector, and a site lost mid-round either leaves a correct, labelled total or a
clear, retryable failure."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.common import bytes_to_ndarray
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from pmlm.client.secure_sum import REQUIRE_SECURE_NODE_KEY, attach_secure_sum, register_vector_task, vector_task
from pmlm.server.in_process import RUN_ID, InProcessGrid, run_in_process
from pmlm.server.secure_sum import SPARSE_NEIGHBOURS, SecureSumFailed, plain_sum, secure_sum, sharing_graph

SHAPE = (6, 5)
TASK = "test_noisy_stats"


def site_of(context: Context) -> int:
    return int(context.node_config.get("site", context.node_config.get("partition-id", -1)))


def site_vector(site: int, config: dict, arrays: dict) -> np.ndarray:
    """What a site's DP release looks like here: its statistic plus Gaussian noise, values up to about +-50."""
    rng = np.random.default_rng(1000 * site + int(config["seed"]))
    return float(config["scale"]) * rng.normal(0.0, 12.0, SHAPE) + arrays["offset"]


def noisy_stats(config: dict, context: Context, arrays: dict) -> tuple[np.ndarray, dict]:
    if context.node_config.get("broken"):
        raise RuntimeError("site data unavailable")
    return site_vector(site_of(context), config, arrays), {"noise_std": 12.0}


register_vector_task(TASK, noisy_stats)


@vector_task("test_slow_at_site_2")
def slow_at_site_2(config: dict, context: Context, arrays: dict) -> np.ndarray:
    if site_of(context) == 2:
        time.sleep(float(config["sleep"]))  # stops answering within the stage's timeout
    return site_vector(site_of(context), config, arrays)

client_app = ClientApp()


@client_app.train()
def phase_a_train(msg: Message, context: Context) -> Message:
    raise AssertionError("phase A's train handler must never see secure-sum traffic")


attach_secure_sum(client_app)


@dataclass
class LossyGrid(InProcessGrid):
    """In-process grid that copies every message like the wire does, turns a raising ClientApp into an error
    reply like a SuperNode does, and loses nodes: a node in `drop_at` never answers from that SecAgg+ stage on
    (or from the first plain query, for stage "query")."""

    drop_at: dict[int, str] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            delivered = self._deliver(msg)
            delivered = Message(content=copy.deepcopy(msg.content), metadata=delivered.metadata)
            ids.append(delivered.metadata.message_id)
            secagg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = str(secagg[Key.STAGE]) if secagg is not None else "query"
            if self.drop_at.get(node) == stage:
                self.gone.add(node)
            if node in self.gone:
                continue
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as ex:  # what a SuperNode sends back when the ClientApp raises
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"),
                                reply_to=delivered)
            self.outbox.append((node, reply))
            self._replies[delivered.metadata.message_id] = reply
        return ids


def make_grid(sites: int = 3, node_extra: dict[int, dict] | None = None) -> tuple[LossyGrid, Context]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    configs = [{"site": i, **(node_extra or {}).get(i, {})} for i in range(sites)]
    grid = LossyGrid(client_app, configs, run_config={})
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return grid, context


CONFIG = {"seed": 7, "scale": 2.0}
ARRAYS = {"offset": np.linspace(-3.0, 3.0, SHAPE[1])}


def exact_sum(grid: LossyGrid, nodes) -> np.ndarray:
    return sum(site_vector(int(grid.contexts[n].node_config["site"]), CONFIG, ARRAYS) for n in nodes)


def run_secure(grid, context, **kwargs):
    nodes = list(grid.get_node_ids())
    return secure_sum(grid, context, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=30, **kwargs)


def test_secure_sum_equals_sum_of_site_vectors_within_quantisation_bound():
    grid, context = make_grid(3)
    start = time.perf_counter()
    result = run_secure(grid, context)
    elapsed = time.perf_counter() - start
    exact = exact_sum(grid, grid.get_node_ids())
    error = np.max(np.abs(result.total - exact))
    assert result.secure and result.sites == sorted(grid.get_node_ids()) and result.dropped == []
    assert np.max(np.abs(exact)) > 30  # DP-sized values, not toy ones
    assert error <= result.quantization_bound < 1e-3, (error, result.quantization_bound)
    assert error > 0  # it really went through the quantiser
    assert result.metrics == {n: {"noise_std": 12.0} for n in grid.get_node_ids()}
    assert elapsed < 10


def test_runs_inside_a_server_app_on_the_projects_in_process_grid():
    server_app = ServerApp()
    seen: dict = {}

    @server_app.main()
    def main(grid, context):
        seen["result"] = secure_sum(grid, context, TASK, CONFIG, sorted(grid.get_node_ids()), shape=SHAPE,
                                    arrays=ARRAYS, timeout=30)

    grid, _ = run_in_process(server_app, client_app, [{"site": i} for i in range(3)], run_config={})
    result = seen["result"]
    assert result.sites == sorted(grid.get_node_ids())
    assert np.max(np.abs(result.total - exact_sum(grid, result.sites))) <= result.quantization_bound


def test_coordinator_receives_only_masked_vectors():
    grid, context = make_grid(3)
    run_secure(grid, context)
    vectors = {n: site_vector(int(grid.contexts[n].node_config["site"]), CONFIG, ARRAYS) for n in grid.contexts}
    masked_seen = 0
    for node, reply in grid.outbox:
        assert not reply.has_error()
        # Nothing in array form leaves a site: the mod empties the FitRes ArrayRecord after masking.
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        plain = vectors[node].tobytes()
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    assert not (isinstance(item, bytes) and plain in item)
        masked = reply.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        if masked is not None:
            masked_seen += 1
            factor_and_vector = [bytes_to_ndarray(b) for b in masked]
            assert len(factor_and_vector) == 2 and factor_and_vector[1].shape == SHAPE
            # Read as if unmasked, a single masked vector is uniform noise over the whole range. Its 30 values are
            # then uncorrelated with the site's: |r| >= 0.7 by chance has probability 1.7e-5 (t-test of r with
            # 28 df; a simulation with uniform values agrees), so 5e-5 for the three sites of a run. The masks are
            # the protocol's own randomness, not seeded. All 30 values within 100 of the site's has odds < 1e-12.
            (alone,) = dequantize([factor_and_vector[1] % 2**24], 256.0, 2**24)
            assert abs(np.corrcoef(alone.ravel(), vectors[node].ravel())[0, 1]) < 0.7
            assert np.max(np.abs(alone - vectors[node])) > 100
    assert masked_seen == 3


def test_site_lost_after_masking_is_unmasked_and_total_covers_exactly_the_others():
    grid, context = make_grid(3)
    lost = sorted(grid.contexts)[1]
    grid.drop_at = {lost: Stage.COLLECT_MASKED_VECTORS}
    result = run_secure(grid, context)
    remaining = [n for n in grid.contexts if n != lost]
    assert result.sites == sorted(remaining) and result.dropped == [lost]
    assert np.max(np.abs(result.total - exact_sum(grid, remaining))) <= result.quantization_bound


def test_site_whose_vector_function_raises_is_named_with_its_reason():
    nodes = list(range(1000, 1003))
    grid, context = make_grid(3, {2: {"broken": True}})
    result = run_secure(grid, context)
    assert result.dropped == [nodes[2]] and result.sites == nodes[:2]
    assert "site data unavailable" in result.reasons[nodes[2]]
    assert np.max(np.abs(result.total - exact_sum(grid, nodes[:2]))) <= result.quantization_bound


def test_site_lost_during_unmasking_is_still_in_the_total():
    grid, context = make_grid(3)
    lost = sorted(grid.contexts)[0]
    grid.drop_at = {lost: Stage.UNMASK}
    result = run_secure(grid, context)
    assert result.dropped == [] and len(result.sites) == 3  # its masked vector arrived before it left
    assert np.max(np.abs(result.total - exact_sum(grid, grid.contexts))) <= result.quantization_bound


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS])
def test_site_lost_before_masking_fails_clearly_then_retry_without_it_succeeds(stage):
    grid, context = make_grid(4)
    lost = sorted(grid.contexts)[2]
    grid.drop_at = {lost: stage}
    with pytest.raises(SecureSumFailed) as failed:
        run_secure(grid, context)
    assert failed.value.retryable and failed.value.unresponsive == [lost]

    grid.gone.clear()
    result = run_secure(grid, context, retries=1)
    remaining = [n for n in grid.contexts if n != lost]
    assert result.attempts == 2 and result.dropped == [lost] and result.sites == sorted(remaining)
    assert np.max(np.abs(result.total - exact_sum(grid, remaining))) <= result.quantization_bound


def test_too_many_sites_lost_fails_instead_of_summing_too_few():
    grid, context = make_grid(3)
    nodes = sorted(grid.contexts)
    grid.drop_at = {nodes[0]: Stage.COLLECT_MASKED_VECTORS, nodes[1]: Stage.COLLECT_MASKED_VECTORS}
    with pytest.raises(SecureSumFailed) as failed:
        run_secure(grid, context)
    assert failed.value.retryable and set(failed.value.unresponsive) == {nodes[0], nodes[1]}
    # And a retry that cannot reach min_sites says so instead of summing one site.
    with pytest.raises(SecureSumFailed):
        run_secure(grid, context, retries=1)


def test_retry_that_runs_out_of_sites_names_why_each_left():
    grid, context = make_grid(3, {i: {"broken": True} for i in range(3)})
    with pytest.raises(SecureSumFailed) as failed:
        run_secure(grid, context, retries=1)
    message = str(failed.value)
    assert "0 nodes left" in message and not failed.value.retryable
    assert message.count("site data unavailable") == 3 and sorted(failed.value.reasons) == sorted(grid.contexts)


def test_sharing_graph_is_complete_for_small_consortia_and_sparse_above():
    assert sharing_graph(3) == (3, 2) and sharing_graph(10) == (10, 6)  # complete, a strict majority
    assert sharing_graph(SPARSE_NEIGHBOURS) == (SPARSE_NEIGHBOURS, SPARSE_NEIGHBOURS // 2 + 1)
    assert sharing_graph(100) == (SPARSE_NEIGHBOURS, SPARSE_NEIGHBOURS // 2 + 1)
    assert sharing_graph(100, neighbours=0) == (100, 51)  # asked for complete
    assert sharing_graph(100, neighbours=8) == (9, 5)  # odd: Flower's ring puts neighbours on both sides
    # A threshold asked for (e.g. a distributed site's k) gets more neighbours than it, of which it is a majority.
    assert sharing_graph(100, threshold=10) == (19, 10)
    assert sharing_graph(100, threshold=40) == (41, 40)
    assert sharing_graph(100, threshold=100) == (100, 100)  # only the complete graph has 100 holders
    assert sharing_graph(100, threshold=30, neighbours=8) == (31, 30)  # raised above the threshold
    for bad in ({"threshold": 1}, {"threshold": 101}, {"neighbours": -1}):
        with pytest.raises(ValueError):
            sharing_graph(100, **bad)
    with pytest.raises(ValueError, match="at least 2 sites"):
        sharing_graph(1)


def _key_exchange_sizes(grid) -> set[int]:
    """How many sites each site exchanged keys with in the last SecAgg+ run (Flower's mod keeps it in state)."""
    return {len(ctx.state.config_records["secaggplus_state"]["public_keys_dict:K"]) for ctx in grid.contexts.values()}


def test_sparse_graph_sum_is_exact_and_each_site_shares_only_with_its_neighbours():
    grid, context = make_grid(9)
    result = run_secure(grid, context, neighbours=5)
    assert (result.neighbours, result.threshold) == (5, 3)
    assert _key_exchange_sizes(grid) == {5}  # not 9: a site's shares go to 4 others
    exact = exact_sum(grid, grid.get_node_ids())
    assert result.sites == sorted(grid.get_node_ids())
    assert 0 < np.max(np.abs(result.total - exact)) <= result.quantization_bound


def test_sparse_graph_unmasks_a_site_lost_after_masking_from_its_neighbours():
    grid, context = make_grid(9)
    lost = sorted(grid.contexts)[4]
    grid.drop_at = {lost: Stage.COLLECT_MASKED_VECTORS}
    result = run_secure(grid, context, neighbours=5)
    remaining = [n for n in grid.contexts if n != lost]
    assert result.sites == sorted(remaining) and result.dropped == [lost]
    assert np.max(np.abs(result.total - exact_sum(grid, remaining))) <= result.quantization_bound


def test_min_sites_stops_before_unmasking():
    grid, context = make_grid(4)
    grid.drop_at = {sorted(grid.contexts)[3]: Stage.COLLECT_MASKED_VECTORS}
    with pytest.raises(SecureSumFailed):
        run_secure(grid, context, min_sites=4)
    # No site was asked to reveal key shares: unmasking never started.
    assert not any(r.content.config_records[RECORD_KEY_CONFIGS].get(Key.NODE_ID_LIST) for _, r in grid.outbox)


def test_vector_outside_clipping_range_is_refused_not_clipped():
    grid, context = make_grid(3)
    with pytest.raises(SecureSumFailed) as failed:
        run_secure(grid, context, clipping_range=20.0)
    assert not failed.value.retryable and "clipping_range" in str(failed.value)


def test_plain_sum_has_the_same_contract():
    grid, context = make_grid(3)
    nodes = sorted(grid.contexts)
    result = plain_sum(grid, context, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=30)
    assert not result.secure and result.sites == nodes
    assert np.allclose(result.total, exact_sum(grid, nodes))

    assert np.allclose(secure_sum(grid, None, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=30).total,
                       result.total, atol=1e-3)  # phases that only hold the grid can pass context=None
    grid.drop_at = {nodes[0]: "query"}
    result = plain_sum(grid, context, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=30)
    assert result.dropped == [nodes[0]] and np.allclose(result.total, exact_sum(grid, nodes[1:]))
    with pytest.raises(SecureSumFailed) as failed:
        plain_sum(grid, context, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=30, min_sites=3)
    assert f"sites left out: {nodes[0]}: " in str(failed.value)


def test_site_can_insist_on_secure_aggregation():
    grid, context = make_grid(3, {0: {REQUIRE_SECURE_NODE_KEY: True}})
    nodes = sorted(grid.contexts)
    result = plain_sum(grid, context, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=30)
    assert result.dropped == [nodes[0]] and "secure aggregation" in result.reasons[nodes[0]]
    assert run_secure(grid, context).sites == nodes


def test_secure_sum_in_flowers_simulation_engine():
    """The same facility on Flower's own (Ray) simulation engine: real serialization, real per-node state."""
    from flwr.simulation import run_simulation
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    server_app = ServerApp()
    seen: dict = {}

    @server_app.main()
    def main(grid, context):
        deadline = time.monotonic() + 30
        while len(nodes := sorted(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)  # the simulated SuperNodes register a moment after the ServerApp starts
        seen["result"] = secure_sum(grid, context, TASK, CONFIG, nodes, shape=SHAPE, arrays=ARRAYS, timeout=60)
        seen["slow"] = secure_sum(grid, context, "test_slow_at_site_2", {**CONFIG, "sleep": 8.0}, nodes,
                                  shape=SHAPE, arrays=ARRAYS, timeout=4)
        seen["nodes"] = nodes

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    result = seen["result"]
    exact = sum(site_vector(i, CONFIG, ARRAYS) for i in range(3))
    assert len(result.sites) == 3 and result.dropped == []
    assert np.max(np.abs(result.total - exact)) <= result.quantization_bound
    # A site that overruns the timeout while computing its vector is unmasked away and named.
    slow = seen["slow"]
    assert len(slow.sites) == 2 and len(slow.dropped) == 1
    on_time = sum(site_vector(i, CONFIG, ARRAYS) for i in range(2))
    assert np.max(np.abs(slow.total - on_time)) <= slow.quantization_bound


def test_vector_handler_refuses_to_answer_outside_secagg():
    """Wired without the SecAgg+ mod, the handler would send the vector in the clear; it refuses instead."""
    from pmlm.client.secure_sum import answer_secure_sum

    grid, _ = make_grid(1)
    msg = Message(content=RecordDict(), dst_node_id=1000, message_type="train.pmlm_secure_sum")
    with pytest.raises(RuntimeError, match="unmasked"):
        answer_secure_sum(grid._deliver(msg), grid.contexts[1000])
