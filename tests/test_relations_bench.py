"""benchmarks/relations.py's same-class AUC against a brute-force count over all pairs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "relations.py"
spec = importlib.util.spec_from_file_location("relations_bench", SCRIPT)
assert spec and spec.loader
relations = importlib.util.module_from_spec(spec)
spec.loader.exec_module(relations)


def test_auc_counts_every_positive_negative_pair_ties_as_half() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).float() / 5  # many ties
    positive = torch.rand(40, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert abs(relations.auc(scores, positive) - float(wins.mean())) < 1e-12
    assert relations.auc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
    assert relations.auc(torch.ones(4), torch.tensor([False, True, False, True])) == 0.5
    assert math.isnan(relations.auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))  # no negatives
