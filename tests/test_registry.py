"""A method registered with one call (drkd.registry) trains through the distill stage, tunes in
its own study, is a compare row and shows in the loss plot: nothing else names it."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from torch import nn

from conftest import toy_params, toy_teacher
from drkd import registry
from drkd.config import ConfigError, DistillConfig, load_params, non_negative, parse_params
from drkd.plots import plot_loss_curves
from stages import compare, distill, tune


@dataclass(frozen=True)
class ToyConfig:
    weight: float = field(default=0.5, metadata=non_negative("float"))


@dataclass(frozen=True)
class ToySpace:
    weight: tuple[float, ...] = (0.1, 1.0)


class Toy(nn.Module):
    """Adapted student maps imitate the teacher's (MSE, mean over levels), times the weight."""

    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.weight = cfg.toy.weight
        self.adapters = nn.ModuleList(nn.Conv2d(c_s, c_t, 1) for _ in range(levels))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], *_: Any,
                ) -> dict[str, torch.Tensor]:
        mse = [nn.functional.mse_loss(a(s), t) for a, s, t in zip(self.adapters, student, teacher,
                                                                  strict=True)]
        return {"loss_toy": self.weight * torch.stack(mse).mean()}


@pytest.fixture
def toy_method() -> Iterator[None]:
    registry.register(registry.MethodSpec("toy", Toy, terms={"loss_toy": "weight"},
                                          config=ToyConfig, space=ToySpace))
    yield
    registry.METHODS.pop("toy")


def test_a_registered_method_trains_tunes_compares_and_plots(
    toy_method: None, tiny_data: Path, tmp_path: Path,
    saved_figures: dict[str, Any],
) -> None:
    teacher = toy_teacher(tiny_data, tmp_path / "teacher.pt")
    params_file = toy_params(
        tmp_path / "params.yaml",
        distill={"method": "toy", "toy": {"weight": 0.25}},
        tune={"study_name": "toy", "n_trials": 2, "epochs": 1, "pruner": "none",
              "spaces": {"toy": {"weight": [0.1, 1.0]}}},
        compare={"methods": {"none": {}, "toy": {},
                             "toy_heavy": {"method": "toy", "toy": {"weight": 2.0}}}},
        evaluate={"batch_size": 4})
    params = load_params(params_file)
    assert params.distill.toy == ToyConfig(weight=0.25)
    assert params.tune.spaces["toy"] == ToySpace()
    assert "toy" in DistillConfig().sections and "toy" in parse_params({}).compare.methods
    with pytest.raises(ConfigError, match=r"distill\.toy\.weight: expected a non-negative"):
        parse_params({"distill": {"toy": {"weight": -1.0}}})

    # Trains: the distill stage, in this process (a subprocess would not have it registered).
    history = tmp_path / "history.csv"
    argv = ["--params", str(params_file), "--data", str(tiny_data), "--teacher", str(teacher),
            "--out", str(tmp_path / "student.pt"), "--history", str(history),
            "--work-dir", str(tmp_path / "work")]
    assert distill.main(argv) == 0
    rows = list(csv.DictReader(history.open()))
    assert rows and all(float(r["loss_toy"]) > 0 for r in rows)

    # Tunes in its own study, the params file's value as trial 0; best into distill.toy.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert tune.main(["--params", str(params_file), "--data", str(tiny_data), "--teacher",
                      str(teacher), "--storage", storage, "--out", str(tmp_path / "tuning"),
                      "--method", "toy"]) == 0
    study = optuna.load_study(study_name="toy-toy", storage=storage)
    assert [t.params for t in study.trials][0] == {"weight": 0.25}
    assert all(0.1 <= t.params["weight"] <= 1.0 for t in study.trials)
    best = yaml.safe_load((tmp_path / "tuning" / "toy" / "best_params.yaml").read_text())
    assert best == {"distill": {"toy": {"weight": study.best_trial.params["weight"]}}}

    # A compare row: its cell depends on the toy section and nothing else of `distill`.
    assert compare.main(["rows", "--params", str(params_file), "--out",
                         str(tmp_path / "rows")]) == 0
    row = json.loads((tmp_path / "rows" / "toy_heavy.json").read_text())
    assert row == {"method": "toy", "toy": {"weight": 2.0}}

    # The loss plot puts its term among the distillation terms.
    columns = {k: [float(r[k]) for r in rows] for k in rows[0]}
    plot_loss_curves({"toy": columns}, tmp_path / "loss_curves.png")
    titles = {ax.get_title(): ax for ax in saved_figures["loss_curves.png"].axes}
    legend = titles["toy: distillation terms"].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["loss_toy"]


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="taken"):
        registry.register(registry.MethodSpec("mgd", Toy, terms={}))
    with pytest.raises(ValueError, match="taken"):  # its section would shadow distill's own
        registry.register(registry.MethodSpec("instance", Toy, terms={}, config=ToyConfig))
    with pytest.raises(ValueError, match="not an identifier"):
        registry.register(registry.MethodSpec("none", Toy, terms={}))
    with pytest.raises(ValueError, match="a space needs a config"):
        registry.register(registry.MethodSpec("spaced", Toy, terms={}, space=ToySpace))
    with pytest.raises(ValueError, match="loss term 'loss_mgd' is mgd's"):  # `plus` sums terms
        registry.register(registry.MethodSpec("mine", Toy, terms={"loss_mgd": "weight"}))
    assert "spaced" not in registry.METHODS and "mine" not in registry.METHODS
