"""Parameter groups, optimizers, learning-rate schedules and loss switches."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..losses import build_loss
from ..volume import TransferSegError


def parameter_groups(network: nn.Module) -> dict:
    """{name: [parameters]}: the network's ``parameter_groups()``, or {"all": ...} without it.
    Parameters that the network's groups leave out form a group "other"."""
    if hasattr(network, "parameter_groups"):
        groups = {name: list(params) for name, params in network.parameter_groups().items()}
    else:
        groups = {"all": list(network.parameters())}
    owner = {}
    for name, params in groups.items():
        for p in params:
            if id(p) in owner and owner[id(p)] != name:
                raise TransferSegError(
                    f"{type(network).__name__}.parameter_groups() puts a parameter in both {owner[id(p)]!r} and {name!r}"
                )
            owner[id(p)] = name
    rest = [p for p in network.parameters() if id(p) not in owner]
    if rest:
        groups["other"] = rest
    return groups


def learning_rate_factor(schedule: dict, t: int, steps: int) -> float:
    """The factor on the base learning rate at stage step ``t`` (0-based) of ``steps``:
    constant 1; step γ^⌊t / step_size⌋; poly (1 − t / steps)^power; multistep γ^(milestones
    passed), a milestone m at step round(m · steps) (VFN sec. 2.3: 0.01, ÷10 at 2/3 and 5/6)."""
    name = schedule["name"]
    if name == "step":
        return schedule["gamma"] ** (t // schedule["step_size"])
    if name == "poly":
        return (1.0 - t / steps) ** schedule["power"]
    if name == "multistep":
        return schedule["gamma"] ** sum(t >= round(m * steps) for m in schedule["milestones"])
    return 1.0


def build_optimizer(groups: dict, stage: dict):
    """A fresh optimizer over the stage's unfrozen groups; returns it and the base lr per group."""
    opt = dict(stage["optimizer"])
    name, lr = opt.pop("name"), opt.pop("lr")
    param_groups = [{"params": params, "lr": stage["group_lr"].get(group, lr), "group": group}
                    for group, params in groups.items() if group not in stage["frozen"] and params]
    if not param_groups:
        raise TransferSegError(f"training stage {stage['name']!r} freezes every parameter group; nothing to train")
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
    optimizer = cls(param_groups, lr=lr, **opt)
    return optimizer, [g["lr"] for g in param_groups]


class PlateauTracker:
    """Says when a loss has stopped improving: after ``patience`` consecutive steps in which the
    mean of the last ``window`` losses did not fall below the best mean so far by more than
    ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 0.0, window: int = 1):
        self.patience, self.min_delta, self.window = patience, min_delta, window
        self.best, self.wait, self.recent = math.inf, 0, []

    def update(self, value: float) -> bool:
        self.recent = (self.recent + [float(value)])[-self.window:]
        if len(self.recent) < self.window:
            return False
        mean = sum(self.recent) / self.window
        if mean < self.best - self.min_delta:
            self.best, self.wait = mean, 0
        else:
            self.wait += 1
        return self.wait >= self.patience

    def state(self) -> dict:
        return {"best": None if math.isinf(self.best) else self.best, "wait": self.wait, "recent": self.recent}

    def load_state(self, state: dict) -> None:
        self.best = math.inf if state["best"] is None else state["best"]
        self.wait, self.recent = state["wait"], list(state["recent"])


class LossSchedule:
    """A stage's loss and its optional switch (``at_step``, ``at_epoch`` or ``on_plateau``)."""

    def __init__(self, spec: dict, steps_per_epoch: int, device):
        spec = dict(spec)
        self.switch = spec.pop("switch", None)
        self.first = (spec["name"], build_loss(spec).to(device))
        self.second = None
        self.at_step, self.tracker = None, None
        if self.switch:
            self.second = (self.switch["to"]["name"], build_loss(self.switch["to"]).to(device))
            if "at_step" in self.switch:
                self.at_step = self.switch["at_step"]
            elif "at_epoch" in self.switch:
                self.at_step = self.switch["at_epoch"] * steps_per_epoch
            else:
                plateau = self.switch["on_plateau"]
                self.tracker = PlateauTracker(plateau["patience"], plateau["min_delta"], plateau["window"])
        self.switched_at = None  # the first stage step that uses the second loss

    def current(self, t: int):
        """(name, loss module) for stage step ``t``."""
        if self.switched_at is None and self.at_step is not None and t >= self.at_step:
            self.switched_at = t
        return self.second if self.switched_at is not None else self.first

    def observe(self, t: int, value: float) -> None:
        """Feed the (global-batch) loss of stage step ``t``; a plateau switches from step t + 1."""
        if self.tracker is not None and self.switched_at is None and self.tracker.update(value):
            self.switched_at = t + 1

    def state(self) -> dict:
        return {"switched_at": self.switched_at, "tracker": self.tracker.state() if self.tracker else None}

    def load_state(self, state: dict) -> None:
        self.switched_at = state["switched_at"]
        if self.tracker is not None and state.get("tracker"):
            self.tracker.load_state(state["tracker"])


def freeze_groups(network: nn.Module, groups: dict, stage: dict) -> list:
    """requires_grad per the stage; returns the BatchNorm modules to keep in eval (``freeze_bn``)."""
    frozen_ids = set()
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name not in stage["frozen"])
            if name in stage["frozen"]:
                frozen_ids.add(id(p))
    if not stage["freeze_bn"]:
        return []
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(True for _ in m.parameters()) and all(id(p) in frozen_ids for p in m.parameters())]
