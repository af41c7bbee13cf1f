"""benchmarks/relations.py's same-class AUC against a brute-force count over all pairs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import relations
from conftest import (
    LEVEL_SIZES,
    box_targets,
    drkd_config,
    fpn_maps,
    toy_distiller,
    write_relation_models,
)
from drkd import cli


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


def test_relation_filter_statistics_on_a_toy_run() -> None:
    """benchmarks/relation_filter.py on toy detectors: the filter's top share per row against a
    count written out here, no self-pairs, and L_IR finite under every filter variant (the
    trained filter is put back afterwards)."""
    from benchmarks.relation_filter import filter_statistics
    from drkd.methods.drkd import instance_rois

    d = toy_distiller(drkd_config("matrix", instance={"similarity": "cosine", "tau": 0.1,
                                                      "topk": 4}))
    s_maps, t_maps = fpn_maps(16, LEVEL_SIZES["retinanet"]), fpn_maps(24, (8, 4, 2, 1, 1), seed=1)
    targets = box_targets([[2, 3, 30, 40], [10, 10, 20, 22], [30, 5, 55, 60], [0, 0, 9, 9]],
                          [[0, 0, 16, 16], [20, 24, 60, 50]])
    targets[0]["labels"] = torch.tensor([1, 2, 1, 3])
    filters = d.method.filters
    stats = filter_statistics(d.method, s_maps, t_maps, targets, (64, 64), level=0)
    assert d.method.filters is filters
    assert stats["instances"] == 6 and stats["self mass"] == 0.0
    # Rows with >= 2 partners: the 4 of image 0 (3 partners each); uniform 1/3.
    assert stats["uniform"] == pytest.approx(1 / 3)
    rois, index, _ = instance_rois(targets)
    _, e_t, mask, _ = d.method.instance_features(0, s_maps, t_maps, rois, index, (64, 64))
    with torch.no_grad():
        w = filters[0](e_t, mask)[0, :4, :4]
    shares = [max(w[i, j] for j in range(4) if j != i) / sum(w[i, j] for j in range(4) if j != i)
              for i in range(4)]
    assert stats["top share"] == pytest.approx(float(sum(shares) / 4), rel=1e-5)
    # The teacher's relation rows themselves: each row's largest entry, over the rows that
    # relate 2 or more partners (image 0's 4 rows, 3 partners each, top-4 keeps them all).
    _, r_t, _ = d.method.matrices(0, e_t, e_t, mask)  # R_t does not depend on the student
    tops = [float(r_t[0, i].max()) for i in range(4)]
    assert stats["R_t top share"] == pytest.approx(sum(tops) / 4, rel=1e-5)
    assert stats["R_t one-hot rows"] == sum(t > 0.99 for t in tops) / 4
    assert all(math.isfinite(stats[k]) for k in
               ("L_IR trained filter", "L_IR fresh filter", "L_IR no filter"))



def test_the_benchmarks_bad_input_is_one_line(tiny_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """As the stages: a missing checkpoint, or modules of a run without DRKD's relations, end in
    one `error:` line and exit 2 (not a traceback)."""
    from benchmarks import relation_filter

    missing = tmp_path / "missing.pt"
    assert cli.run(relations.main, ["--teacher", str(missing), "--data",
                                    str(tiny_data / "val.json")]) == 2
    assert capsys.readouterr().err == f"error: {missing}: checkpoint not found\n"
    pkd = write_relation_models(tiny_data, tmp_path, method="pkd")
    argv = ["--teacher", str(pkd["teacher"]), "--student", str(pkd["student_drkd"]),
            "--modules", str(pkd["modules"]), "--data", str(tiny_data / "val.json")]
    assert cli.run(relation_filter.main, argv) == 2
    assert capsys.readouterr().err == (f"error: {pkd['modules']}: the run has no DRKD instance "
                                       "relations (method pkd, or w_ir 0)\n")
