import math

import numpy as np

from pmlm.common.metrics import auroc, ndcg_at_k, recall_at_k


def test_recall_and_ndcg_by_hand():
    ranked = ["a", "b", "c", "d", "e"]
    assert recall_at_k(ranked, {"a", "x"}, 5) == 0.5
    assert recall_at_k(ranked, {"a", "b", "c", "d", "e", "f", "g"}, 5) == 1.0  # normalised by min(k, |T|)
    assert math.isnan(recall_at_k(ranked, set(), 5))
    assert ndcg_at_k(ranked, {"a"}, 5) == 1.0
    assert abs(ndcg_at_k(ranked, {"b"}, 5) - 1 / math.log2(3)) < 1e-12


def test_auroc_rank_statistic_with_ties():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))
