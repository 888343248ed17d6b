"""The secure-sum facility's contract: the message types, the meta record and the error marker that a site
(client/secure_sum.py) and the coordinator (server/secure_sum.py) agree on. A sum is SecAgg+ (the coordinator sees
only the total) or plain (each site's own DP-noised vector).
"""

from __future__ import annotations

import json

SECURE_ACTION = "pmlm_secure_sum"  # message type train.pmlm_secure_sum: the SecAgg+ stages
PLAIN_ACTION = "pmlm_plain_sum"  # message type query.pmlm_plain_sum: one plain DP vector per site
META_KEY = "pmlm-sum.meta"  # JSON: task, shape, array names, clipping range, SecAgg+ weight
RANGE_ERROR = "SecureSumRangeError"  # marker the coordinator looks for in a site's error reply


def pack_meta(task: str, shape: tuple[int, ...], array_names: list[str], clipping_range: float | None,
              weight: int | None) -> str:
    return json.dumps({"task": task, "shape": list(shape), "arrays": array_names, "clip": clipping_range,
                       "weight": weight})
