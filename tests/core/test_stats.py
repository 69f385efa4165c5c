"""Average ranks, shared by the explanation sanity checks and the ROC-AUC metric."""
from __future__ import annotations

import torch

from lungvit.core.explain.faithfulness import spearman
from lungvit.core.stats import average_ranks


def test_ties_share_the_mean_of_their_ranks() -> None:
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    assert average_ranks(x).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert average_ranks(torch.empty(0)).numel() == 0


def test_spearman_with_ties() -> None:
    # Ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4): Pearson of the ranks, by hand 0.9487.
    assert abs(spearman([1.0, 1.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0]) - 0.9486833) < 1e-6
    assert abs(spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) + 1.0) < 1e-12
