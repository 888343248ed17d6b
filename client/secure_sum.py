"""The site's side of the secure-sum facility: a vector computed here leaves the site only masked (SecAgg+)
or, when the coordinator runs a plain sum, as the site's own DP-noised vector.

Phases register what vector a task means (``register_vector_task``); the ClientApp owner calls
``attach_secure_sum(app)`` once. The coordinator side is server/secure_sum.py; what both agree on, common/secure_sum.py.

The seam with Flower 1.42: SecAgg+ exists only on the legacy path. Its ``secaggplus_mod`` acts only on
messages of type exactly ``train`` and expects the handler to answer in the legacy FitRes layout
(``fitres.parameters`` etc.). Plain ``train`` is phase A's handler, so the coordinator sends the SecAgg+
stages as ``train.pmlm_secure_sum``; ``secure_sum_mod`` below shows them to Flower's mod as ``train`` and
gives the reply its real type back. The mod masks the FitRes vector and empties the ArrayRecord that held it
before the reply leaves, so the unmasked vector never leaves the site.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import json
from typing import Callable, Union

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from pmlm.common.privacy.shared_noise import KeyExchange
from pmlm.common.secure_sum import META_KEY, PLAIN_ACTION, RANGE_ERROR, SECURE_ACTION

REQUIRE_SECURE_NODE_KEY = "secure-sum-required"  # node config: this site refuses plain sums

VectorResult = Union[np.ndarray, tuple[np.ndarray, dict]]
VectorFn = Callable[[dict, Context, dict[str, np.ndarray]], VectorResult]

_TASKS: dict[str, VectorFn] = {}
# Set only while Flower's SecAgg+ mod is running, so the FitRes handler can refuse to answer outside it.
_INSIDE_SECAGG: contextvars.ContextVar[bool] = contextvars.ContextVar("pmlm_inside_secagg", default=False)
# The SecAgg+ key exchange of the sum the vector being computed goes to (None: a plain sum).
_KEYS: contextvars.ContextVar[KeyExchange | None] = contextvars.ContextVar("pmlm_secagg_keys", default=None)
SECAGG_STATE_KEY = "secaggplus_state"  # where Flower's mod keeps its per-node state (context.state)


def secure_sum_key_exchange() -> KeyExchange | None:
    """While a vector task runs under SecAgg+: the node ids that exchanged keys for this sum and the threshold
    this site's own secrets were shared with, as it saw them in the protocol's state (not the coordinator's
    word: those are the keys and the threshold its masks depend on). None for a plain sum."""
    return _KEYS.get()


class SecureSumRangeError(ValueError):
    """The site's vector does not fit the quantisation range; clipping it would silently change the sum."""


def register_vector_task(name: str, fn: VectorFn) -> VectorFn:
    """Register ``fn(config, context, arrays) -> vector`` (or ``(vector, metrics)``) as task ``name``.

    ``fn`` runs at the site, draws and charges its own DP noise, and returns the already-noised vector.
    ``arrays`` holds the numpy arrays the coordinator sent (e.g. centroids, policy weights), by name.
    ``metrics`` (optional) are scalars that travel in the clear next to the vector, e.g. the noise std the
    site used; never put anything per patient there.
    """
    if name in _TASKS and _TASKS[name] is not fn:
        raise ValueError(f"vector task {name!r} is already registered")
    _TASKS[name] = fn
    return fn


def vector_task(name: str) -> Callable[[VectorFn], VectorFn]:
    """Decorator form of ``register_vector_task``."""
    return lambda fn: register_vector_task(name, fn)


def _compute(tasks: dict[str, VectorFn], config: dict, arrays: list[np.ndarray],
             context: Context) -> tuple[np.ndarray, dict, dict]:
    """Run the registered task for this request; check the vector before anything is sent."""
    config = dict(config)
    meta = json.loads(str(config.pop(META_KEY)))
    if meta["task"] not in tasks:
        raise KeyError(f"no vector task {meta['task']!r} registered at this site")
    named = dict(zip(meta["arrays"], arrays, strict=True))
    out = tasks[meta["task"]](config, context, named)
    vector, metrics = out if isinstance(out, tuple) else (out, {})
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape != tuple(meta["shape"]):
        raise ValueError(f"task {meta['task']!r} gave shape {vector.shape}, the coordinator expects "
                         f"{tuple(meta['shape'])}")
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"task {meta['task']!r} gave a non-finite vector")
    return vector, dict(metrics), meta


def secure_sum_mod(msg: Message, context: Context, call_next) -> Message:
    """Run Flower's SecAgg+ client mod on a ``train.pmlm_secure_sum`` message (it only handles ``train``)."""
    original_type = msg.metadata.message_type
    metadata = copy.copy(msg.metadata)  # the incoming message itself stays as the runtime delivered it
    metadata.message_type = MessageType.TRAIN
    seen = Message(content=msg.content, metadata=metadata)
    token = _INSIDE_SECAGG.set(True)
    try:
        reply = secaggplus_mod(seen, context, call_next)
    finally:
        _INSIDE_SECAGG.reset(token)
    reply.metadata.message_type = original_type
    return reply


def answer_secure_sum(msg: Message, context: Context, tasks: dict[str, VectorFn] = _TASKS) -> Message:
    """SecAgg+'s 'collect masked vectors' stage: hand the vector to the mod in the legacy FitRes layout."""
    if not _INSIDE_SECAGG.get():
        raise RuntimeError("answer_secure_sum must run under secure_sum_mod; refusing to send an unmasked vector")
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    # Flower's mod saved this after the key-sharing stage: the keys and threshold this site's shares were made with.
    state = context.state.config_records.get(SECAGG_STATE_KEY) or {}
    keys = KeyExchange(tuple(sorted(int(n) for n in state.get("public_keys_dict:K", []))),
                       int(state.get("threshold", 0)))
    token = _KEYS.set(keys)
    try:
        vector, metrics, meta = _compute(tasks, dict(fitins.config), parameters_to_ndarrays(fitins.parameters),
                                         context)
    finally:
        _KEYS.reset(token)
    clip = float(meta["clip"])
    if np.max(np.abs(vector), initial=0.0) > clip:
        # Flower's quantiser would clip silently and the total would be wrong without anyone noticing.
        raise SecureSumRangeError(f"{RANGE_ERROR}: task {meta['task']!r} vector exceeds clipping_range={clip}")
    # num_examples == SecAgg+'s max_weight makes the site's weight exactly 1, so the protocol's weighted
    # average is the plain mean; the coordinator multiplies by the number of contributing sites.
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), int(meta["weight"]), metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def answer_plain_sum(msg: Message, context: Context, tasks: dict[str, VectorFn] = _TASKS,
                     check_plain: Callable[[Context], None] | None = None) -> Message:
    """Plain DP sum: the site's noised vector goes to the coordinator as it is (if the site allows it)."""
    if bool(context.node_config.get(REQUIRE_SECURE_NODE_KEY, False)):
        raise PermissionError("this site only releases vectors under secure aggregation")
    if check_plain is not None:
        check_plain(context)  # raises to refuse, before anything is computed
    arrays = msg.content.array_records.get("arrays")
    vector, metrics, _ = _compute(tasks, dict(msg.content["config"]), arrays.to_numpy_ndarrays() if arrays else [],
                                  context)
    content = RecordDict({"vector": ArrayRecord(numpy_ndarrays=[vector]), "metrics": ConfigRecord(metrics)})
    return Message(content, reply_to=msg)


def attach_secure_sum(app: ClientApp, check_plain: Callable[[Context], None] | None = None) -> ClientApp:
    """Register both sum handlers on the site's ClientApp (SecAgg+ stages and plain sums).

    `check_plain(context)` raises when the site refuses plain (unmasked) sums, e.g. by its privacy policy.

    The handlers hold the registry itself, not a module global, so a ClientApp object pickled into other
    processes (Flower's Ray simulation) still knows every task registered before it was sent."""
    app.train(SECURE_ACTION, mods=[secure_sum_mod])(functools.partial(answer_secure_sum, tasks=_TASKS))
    app.query(PLAIN_ACTION)(functools.partial(answer_plain_sum, tasks=_TASKS, check_plain=check_plain))
    return app
