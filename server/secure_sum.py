"""The coordinator's secure sum: the total of the sites' (already DP-noised) vectors, never one site's vector.

``secure_sum`` runs Flower's own SecAgg+ protocol (``SecAggPlusWorkflow``) from inside a Message-API
``@app.main()``; ``plain_sum`` has the same signature and result for runs without secure aggregation (each
site's DP-noised vector reaches the coordinator, which adds them up).

The seam with Flower 1.42 (SecAgg+ exists only on the legacy path):

* ``SecAggPlusWorkflow`` wants a ``LegacyContext`` (legacy Strategy + client manager). We build one per call
  over a fresh state: a one-shot strategy whose ``configure_fit`` names the chosen nodes and whose
  ``aggregate_fit`` only keeps the unmasked total and which sites it covers.
* The workflow sends its four stages as message type ``train``, which is phase A's handler at the sites, and
  it only calls ``send_and_receive`` on the grid; ``_SecAggChannel`` renames them ``train.pmlm_secure_sum``
  (the site's side, client/secure_sum.py, renames them back for Flower's client mod) and notes which node answered what.
* The workflow returns a weighted *average*: each site sends ``[w, w*x]`` with ``w = num_examples/max_weight``.
  Sites report ``num_examples = max_weight`` so every ``w`` is exactly 1; the average times the number of
  contributing sites is the plain sum (exact: the protocol divides by that integer count).
* A halted protocol only logs and returns; we turn that into ``SecureSumFailed``.

Quantisation: each site maps ``[-clipping_range, clipping_range]`` to ``quantization_range`` integer steps with
stochastic rounding, so each site adds an unbiased error of less than one step ``2*clipping_range /
quantization_range`` per entry. Defaults (256, 2**24) give a step of 3.05e-5: at most n steps on the total,
far below any useful DP noise. A site whose vector leaves the range refuses rather than be clipped.
The masked sum lives modulo 2**32, so sites * quantization_range must stay below 2**32 (255 sites here).

Dropout: a site lost after it sent its masked vector is unmasked from its neighbours' key shares; the total
is then the sum over exactly ``result.sites`` and ``result.dropped`` names the rest. A site lost earlier
(setup or key sharing), or too many lost, halts the protocol: ``SecureSumFailed(retryable=True)`` names the
silent nodes, and ``retries`` restarts without them. A retry asks the sites for the same round again: phases B
and C keep each round's noisy release (common/privacy/kept.py), so a site that had already computed its vector
sends the same one and is not charged again; a task without kept releases is refused by the site's ledger.
``secure_sum_over`` runs a phase round over the sites still in the run and drops the ones it lost.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from pmlm.common.secure_sum import META_KEY, PLAIN_ACTION, RANGE_ERROR, SECURE_ACTION, pack_meta
from pmlm.server.roster import SiteRoster

log = logging.getLogger(__name__)

MODULUS_RANGE = 2**32  # SecAgg+'s mask modulus; its documented maximum
# Above this many sites a sum shares each site's secrets with SPARSE_NEIGHBOURS sites (itself included), not all:
# Shamir sharing and reconstruction cost each site O(neighbours x threshold), so a complete graph costs a sum
# O(S^2 x S) and took 4.5-5 min at 100 sites on 2 cores, against 15-20 s at 30 (bench/README.md).
SPARSE_NEIGHBOURS = 21
DEFAULT_CLIPPING_RANGE = 256.0
DEFAULT_QUANTIZATION_RANGE = 2**24
SITE_WEIGHT = 1000  # SecAgg+'s max_weight; each site reports num_examples equal to it (weight exactly 1)
_ATTEMPTS = itertools.count(1)  # SecAgg+ group ids: one per protocol run in this process


@dataclass
class SecureSumResult:
    total: np.ndarray
    sites: list[int]  # nodes whose vectors are in `total`
    dropped: list[int]  # asked but not in `total`
    secure: bool  # True: SecAgg+, the coordinator never held one site's vector
    quantization_bound: float = 0.0  # |total - exact sum| is below this, per entry (0 for plain sums)
    metrics: dict[int, dict] = field(default_factory=dict)  # per-site clear scalars the task chose to report
    reasons: dict[int, str] = field(default_factory=dict)  # error replies of dropped sites
    attempts: int = 1
    neighbours: int = 0  # sites each site's secrets were shared with, itself included (all asked: complete graph)
    threshold: int = 0  # shares that reconstruct one secret


def sharing_graph(sites: int, threshold: int | None = None, neighbours: int | None = None) -> tuple[int, int]:
    """SecAgg+'s (neighbours, threshold) for a sum over ``sites`` sites.

    ``neighbours``: how many sites hold shares of each site's secrets, itself included. None picks a complete
    graph up to SPARSE_NEIGHBOURS sites and SPARSE_NEIGHBOURS above (kept between threshold + 1 and a graph of
    which the threshold is a majority); 0 asks for a complete graph. It is raised to exceed ``threshold``
    (SecAgg+ needs more shares than it reconstructs from), made odd (Flower puts each site's neighbours
    symmetrically around it on a ring), and a graph of ``sites`` or more is the complete one. ``threshold``:
    None takes a strict majority of the neighbours. A site sharing its noise with k checks for itself that the
    threshold is at least k (client/site_policy.py); it does not rely on the coordinator's choice here.
    """
    if sites < 2:
        raise ValueError(f"a secure sum needs at least 2 sites, got {sites}")
    if neighbours is not None and neighbours < 0:
        raise ValueError(f"neighbours must be >= 0 (0: complete graph), got {neighbours}")
    if threshold is not None and not 2 <= threshold <= sites:
        raise ValueError(f"reconstruction threshold {threshold} must lie in [2, {sites}] for {sites} sites")
    d = (neighbours or sites) if neighbours is not None else SPARSE_NEIGHBOURS
    if threshold is not None:
        d = max(d, threshold + 1)
        if neighbours is None:
            d = min(d, 2 * threshold - 1)
    d = max(d, 3) | 1
    if d >= sites:
        return sites, threshold or max(2, sites // 2 + 1)
    return d, threshold or d // 2 + 1


class SecureSumFailed(RuntimeError):
    """No trustworthy total this time. ``retryable``: a new attempt without ``unresponsive`` may succeed."""

    def __init__(self, message: str, *, retryable: bool, unresponsive: list[int] | None = None,
                 reasons: dict[int, str] | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.unresponsive = sorted(unresponsive or [])
        self.reasons = dict(reasons or {})


def with_reasons(message: str, reasons: dict[int, str]) -> str:
    """`message` naming why each site left (a budget refusal, a data error): a bare count sends people to logs."""
    why = "; ".join(f"{n}: {r[:200]}" for n, r in sorted(reasons.items()))
    return f"{message}; sites left out: {why}" if why else message


# -- SecAgg+ ---------------------------------------------------------------------------------------------

class _OneShotSum(Strategy):
    """The legacy Strategy SecAggPlusWorkflow needs: asks the chosen nodes, keeps the unmasked total."""

    def __init__(self, grid: Grid, run_id: int, nodes: list[int], config: dict):
        self.proxies = [GridClientProxy(node, grid, run_id) for node in nodes]
        self.config = config
        self.average: np.ndarray | None = None
        self.sites: list[int] = []
        self.metrics: dict[int, dict] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        (self.average,) = parameters_to_ndarrays(results[0][1].parameters)  # every FitRes carries the total
        self.sites = sorted(proxy.node_id for proxy, _ in results)
        self.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in results}
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ that stops before unmasking when fewer than `min_sites` masked vectors arrived."""

    def __init__(self, *args, min_sites: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        if len(state.active_node_ids) < self.min_sites:
            log.error("secure sum: %d masked vectors, fewer than min_sites=%d; not unmasking",
                      len(state.active_node_ids), self.min_sites)
            return False
        return True


class _SecAggChannel:
    """What SecAggPlusWorkflow sees as its grid: sends its stages under our message type, notes the replies."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.silent: dict[str, set[int]] = {}  # stage -> nodes that sent no reply
        self.failed: dict[str, set[int]] = {}  # stage -> nodes that sent an error reply
        self.reasons: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = ""
        for msg in messages:
            msg.metadata.message_type = f"train.{SECURE_ACTION}"
            # The workflow gives all nodes one content object and Flower's client mod edits what it receives;
            # over a wire that is harmless, on an in-process grid the second node would see the first's edits.
            msg.content = copy.deepcopy(msg.content)
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, stage))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        replied, failed = set(), set()
        for reply in replies:
            node = reply.metadata.src_node_id
            replied.add(node)
            if reply.has_error():
                failed.add(node)
                self.reasons.setdefault(node, str(reply.error.reason))
        self.silent[stage] = {m.metadata.dst_node_id for m in messages} - replied
        self.failed[stage] = failed
        return replies

    def lost(self) -> list[int]:
        """Nodes to leave out of a retry: silent at some stage, or failing up to and including masking.
        Errors while unmasking are left alone: they follow from other nodes' loss (no key shares to give)."""
        own = [ns for stage, ns in self.failed.items() if stage != Stage.UNMASK]
        return sorted(set().union(*self.silent.values(), *own))

    def summary(self) -> str:
        parts = [f"{stage}: silent {sorted(self.silent[stage])}, errors {sorted(self.failed[stage])}"
                 for stage in self.silent if self.silent[stage] or self.failed[stage]]
        return "; ".join(parts) or "no node lost"


def _check_request(nodes: list[int], config: dict,
                   arrays: dict[str, np.ndarray] | None) -> tuple[list[str], list[np.ndarray]]:
    if len(set(nodes)) != len(nodes):
        raise ValueError("nodes must be distinct")
    for key, value in config.items():  # SecAgg+ carries the config as a legacy FitIns config: scalars only
        if not isinstance(value, (bool, int, float, str, bytes)):
            raise TypeError(f"config[{key!r}] is {type(value).__name__}; send arrays through `arrays`")
    names = list((arrays or {}).keys())
    return names, [np.asarray(a) for a in (arrays or {}).values()]


def _secure_sum_once(grid: Grid, context: Context | None, task: str, config: dict, nodes: list[int], *,
                     shape: tuple[int, ...], arrays: dict[str, np.ndarray] | None, timeout: float | None,
                     min_sites: int, clipping_range: float, quantization_range: int,
                     reconstruction_threshold: int | None, neighbours: int | None) -> SecureSumResult:
    names, values = _check_request(nodes, config, arrays)
    fit_config = {**config, META_KEY: pack_meta(task, shape, names, clipping_range, SITE_WEIGHT)}
    run_id = context.run_id if context is not None else int(getattr(grid.run, "run_id", 0))
    strategy = _OneShotSum(grid, run_id, nodes, fit_config)
    # A fresh state: the workflow reads its round and parameters from there and must not touch the app's.
    state = RecordDict({
        MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: next(_ATTEMPTS)}),
        MAIN_PARAMS_RECORD: ArrayRecord(numpy_ndarrays=values),
    })
    legacy = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=state,
                run_config=dict(context.run_config) if context is not None else {}),
        config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=SimpleClientManager())
    degree, threshold = sharing_graph(len(nodes), reconstruction_threshold, neighbours)
    # Flower reads a float num_shares as a share of the sites (1.0: complete graph), an int as a count.
    workflow = _Workflow(1.0 if degree == len(nodes) else degree, threshold, max_weight=float(SITE_WEIGHT), clipping_range=float(clipping_range),
                         quantization_range=int(quantization_range), modulus_range=MODULUS_RANGE,
                         timeout=timeout, min_sites=min_sites)
    channel = _SecAggChannel(grid)
    workflow(channel, legacy)

    if strategy.average is None:
        reasons = dict(channel.reasons)
        range_errors = sorted(n for n, r in reasons.items() if RANGE_ERROR in r)
        if range_errors:
            raise SecureSumFailed(f"secure sum of {task!r}: sites {range_errors} have values outside "
                                  f"clipping_range={clipping_range}; raise it for this task",
                                  retryable=False, unresponsive=range_errors, reasons=reasons)
        raise SecureSumFailed(with_reasons(f"secure sum of {task!r} halted ({channel.summary()}); min_sites="
                                           f"{min_sites}, reconstruction threshold {threshold}", reasons),
                              retryable=True, unresponsive=channel.lost(), reasons=reasons)
    dropped = sorted(set(nodes) - set(strategy.sites))
    reasons = {n: r for n, r in channel.reasons.items() if n in dropped}
    range_errors = sorted(n for n, r in reasons.items() if RANGE_ERROR in r)
    if range_errors:  # the protocol finished without them, but leaving a site out for a config error is wrong
        raise SecureSumFailed(f"secure sum of {task!r}: sites {range_errors} have values outside "
                              f"clipping_range={clipping_range}; raise it for this task",
                              retryable=False, unresponsive=range_errors, reasons=reasons)
    total = strategy.average * len(strategy.sites)
    if total.shape != tuple(shape):
        raise SecureSumFailed(f"secure sum of {task!r}: total has shape {total.shape}, expected {tuple(shape)}",
                              retryable=False)
    step = 2.0 * clipping_range / quantization_range
    return SecureSumResult(total=total, sites=strategy.sites, dropped=dropped, secure=True,
                           quantization_bound=len(strategy.sites) * step, metrics=strategy.metrics,
                           reasons=reasons, neighbours=degree, threshold=threshold)


def secure_sum(grid: Grid, context: Context | None, task: str, config: dict, nodes: list[int], *,
               shape: tuple[int, ...], timeout: float | None, arrays: dict[str, np.ndarray] | None = None,
               min_sites: int = 2, retries: int = 0, clipping_range: float = DEFAULT_CLIPPING_RANGE,
               quantization_range: int = DEFAULT_QUANTIZATION_RANGE,
               reconstruction_threshold: int | None = None, neighbours: int | None = None) -> SecureSumResult:
    """Sum the vectors that task ``task`` computes at ``nodes`` under SecAgg+; see the module docstring.

    ``context``: the ServerApp's context (only its run id and run config are read; None takes the grid's run).
    ``config``: scalars (bool, int, float, str, bytes) handed to the task at each site; ``arrays``: numpy
    arrays sent along by name (e.g. centroids, policy weights); ``shape``: the vector shape every site must
    return; ``timeout``: seconds per protocol stage (None waits for every reply); ``min_sites`` (>= 2): fewer
    contributing sites than this is a failure, and one site's "sum" would be its vector. Pick ``timeout``
    to cover the sites' computation of the vector (it runs inside the masking stage); None can wait forever.
    ``reconstruction_threshold`` and ``neighbours``: the sharing graph (``sharing_graph``).
    Raises ``SecureSumFailed`` (see ``retryable``) when no correct total could be formed.
    """
    min_sites = max(2, int(min_sites))
    if int(quantization_range) * len(nodes) >= MODULUS_RANGE:
        raise ValueError(f"{len(nodes)} sites x quantization_range {quantization_range} overflow the SecAgg+ "
                         f"modulus 2**32; lower quantization_range")
    asked, nodes, reasons = list(nodes), list(nodes), {}
    for attempt in range(1, retries + 2):
        if len(nodes) < min_sites:
            raise SecureSumFailed(with_reasons(f"secure sum of {task!r}: {len(nodes)} nodes left, "
                                               f"min_sites={min_sites}", reasons),
                                  retryable=False, unresponsive=[], reasons=dict(reasons))
        try:
            result = _secure_sum_once(grid, context, task, config, nodes, shape=shape, arrays=arrays,
                                      timeout=timeout, min_sites=min_sites, clipping_range=clipping_range,
                                      quantization_range=quantization_range,
                                      reconstruction_threshold=reconstruction_threshold,
                                      neighbours=neighbours)
        except SecureSumFailed as failed:
            if not failed.retryable or attempt > retries:
                # The sites an earlier attempt left out are lost too: name them (and why) with the last failure,
                # so the roster drops them rather than keeping dead sites and dropping only the last ones asked.
                failed.unresponsive = sorted(set(failed.unresponsive) | (set(asked) - set(nodes)))
                failed.reasons = {**reasons, **failed.reasons}
                raise
            log.warning("%s; retrying without %s", failed, failed.unresponsive)
            nodes = [n for n in nodes if n not in failed.unresponsive]
            reasons.update({n: r for n, r in failed.reasons.items() if n in failed.unresponsive})
            continue
        result.attempts = attempt
        result.dropped = sorted(set(asked) - set(result.sites))  # also those left out of the retry
        result.reasons = {**reasons, **result.reasons}
        return result
    raise AssertionError("unreachable")


# -- plain DP sums ---------------------------------------------------------------------------------------

def plain_sum(grid: Grid, context: Context | None, task: str, config: dict, nodes: list[int], *,
              shape: tuple[int, ...], timeout: float | None, arrays: dict[str, np.ndarray] | None = None,
              min_sites: int = 1, retries: int = 0, clipping_range: float | None = None,
              quantization_range: int | None = None, reconstruction_threshold: int | None = None) -> SecureSumResult:
    """Same call and result as ``secure_sum`` without secure aggregation: each site's DP-noised vector arrives
    here and is added up. The SecAgg+-only keywords are accepted and unused so callers switch with one flag;
    a retry asks the same nodes again (leaving the silent ones out could not reach min_sites)."""
    names, values = _check_request(nodes, config, arrays)
    nodes = list(nodes)
    for attempt in range(1, retries + 2):
        meta = pack_meta(task, shape, names, None, None)
        content = RecordDict({"config": ConfigRecord({**config, META_KEY: meta}),
                              "arrays": ArrayRecord(numpy_ndarrays=values)})
        messages = [Message(content=content, dst_node_id=n, message_type=f"query.{PLAIN_ACTION}") for n in nodes]
        total, sites, metrics, reasons = np.zeros(shape), [], {}, {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                reasons[node] = str(reply.error.reason)
                continue
            (vector,) = reply.content["vector"].to_numpy_ndarrays()
            if vector.shape != tuple(shape):
                reasons[node] = f"shape {vector.shape}, expected {tuple(shape)}"
                continue
            total = total + vector
            sites.append(node)
            metrics[node] = dict(reply.content["metrics"])
        dropped = sorted(set(nodes) - set(sites))
        if len(sites) >= min_sites:
            return SecureSumResult(total=total, sites=sorted(sites), dropped=dropped, secure=False, metrics=metrics,
                                   reasons=reasons, attempts=attempt)
        silent = {n: f"no reply within {timeout} s" for n in dropped if n not in reasons}
        failed = SecureSumFailed(with_reasons(f"plain sum of {task!r}: {len(sites)} sites answered, "
                                              f"min_sites={min_sites}", {**silent, **reasons}),
                                 retryable=True, unresponsive=dropped, reasons=reasons)
        if attempt > retries:
            raise failed
        log.warning("%s; retrying", failed)
    raise AssertionError("unreachable")


# -- over the sites still in a run ------------------------------------------------------------------------

def secure_sum_over(roster: SiteRoster, grid: Grid, phase: str, round: int, task: str, config: dict, *,
                    shape: tuple[int, ...], timeout: float | None, arrays: dict[str, np.ndarray] | None = None,
                    clipping_range: float = DEFAULT_CLIPPING_RANGE, threshold: int | None = None,
                    neighbours: int | None = None) -> SecureSumResult:
    """``secure_sum`` of one phase round over ``roster.active`` (server/roster.py), with one retry.
    ``threshold`` and ``neighbours``: SecAgg+'s sharing graph (``sharing_graph``); a site whose policy shares its
    noise with at least k sites refuses a threshold below k (client/site_policy.py).

    Sites the total leaves out, or that made the protocol halt, are dropped from the roster with their reason;
    too few left raises ``TooFewSites``. A retry resends the round: the sites that already released it send the
    same noisy vector again (common/privacy/kept.py), so nothing is charged twice.
    """
    roster.require(phase, round)
    try:
        result = secure_sum(grid, None, task, config, roster.active, shape=shape, arrays=arrays, timeout=timeout,
                            min_sites=roster.min_sites, retries=1, clipping_range=clipping_range,
                            reconstruction_threshold=threshold, neighbours=neighbours)
    except SecureSumFailed as failed:
        for node in failed.unresponsive:
            roster.drop(node, phase, round, failed.reasons.get(node, f"silent during secure aggregation: {failed}"))
        roster.require(phase, round)
        raise
    for node in result.dropped:
        roster.drop(node, phase, round, result.reasons.get(node, "left out of the secure sum: no answer in time"))
    roster.require(phase, round)
    return result
