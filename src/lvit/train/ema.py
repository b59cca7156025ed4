"""Exponential moving averages of a network's weights: the mean teacher's teacher and ``optim.ema_decay``.

With ``optim.ema_decay: d`` (0: off) a supervised run keeps an average of its network next to it::

    after optimizer step t:   average = d_t * average + (1 - d_t) * network,   d_t = min(d, (1 + t) / (10 + t))

validates the average, and saves the average as the run's best and last weights; the network itself trains as
without it. The ramp ``d_t`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) keeps the first
steps from tying the average to the random initial weights. Why it is there: on QaTa-COV19 most of the mean
teacher's gain came from the averaging alone (docs/SEMI_SUPERVISED.md), which a supervised run can have too.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    """The decay used after optimizer step ``step`` (counted from 1): ``min(decay, (1 + step) / (10 + step))``."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for every parameter and floating-point buffer;
    integer buffers (BatchNorm's ``num_batches_tracked``) are copied.

    BatchNorm's running mean and variance are averaged with the same decay rather than copied: the average runs
    in eval mode, so it normalises with them, and statistics averaged like the weights describe the averaged
    weights' activations better than the student's latest ones do.
    """
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        raise ValueError("teacher and student must be the same network")
    for name, t in t_params.items():
        t.mul_(decay).add_(s_params[name].detach(), alpha=1.0 - decay)
    for name, t in t_buffers.items():
        s = s_buffers[name]
        if t.dtype.is_floating_point:
            t.mul_(decay).add_(s.to(t.dtype), alpha=1.0 - decay)
        else:
            t.copy_(s)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, each once (the lists :func:`ema_update` averages)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@torch.no_grad()
def swap_weights(a: nn.Module, b: nn.Module) -> None:
    """Exchange the values of every parameter and buffer of two copies of one network, in place (the tensors
    themselves stay where they are, so an optimizer holding ``a``'s parameters keeps training ``a``)."""
    a_tensors, b_tensors = _tensors(a), _tensors(b)
    if a_tensors.keys() != b_tensors.keys():
        raise ValueError("both modules must be the same network")
    for name, x in a_tensors.items():
        y = b_tensors[name]
        held = x.detach().clone()
        x.detach().copy_(y.detach())
        y.detach().copy_(held)


__all__ = ["ema_decay_at", "ema_update", "swap_weights"]
