"""Networks seen through a wrapper while sampling: the softmax temperature of
``eval.temperatures`` and the swap that puts a wrapper where a module's sampler reads it.

A wrapper exposes the network interface the samplers call (flow/sampling.py,
flow/masked.py through algo.MDLM, flow/autoregressive.py through algo.AR): ``features(h, t,
t2)``, ``head(hidden, c)``, ``denoised(hidden, c, project)``, ``input_embedding``,
``embed_tokens``, ``embed_state``, ``forward``; anything else (``project``, ``table``, ...) is the
wrapped network's own, so ``hasattr`` checks on the wrapper see what they would see on it.
The samplers are unchanged: a module samples with the wrapper because it sits in the
module's slot for the duration of a ``with swapped_prediction_network(...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flow.flow_map import softmax_wide


class TemperatureNetwork(torch.nn.Module):
    """The wrapped network with its output logits divided by ``temperature`` T: every
    softmax a sampler takes of them becomes ``softmax(logits / T)``.

    What that tempers per algorithm (docs/math.md §4-7): FLM, the x1 posterior softmax of
    the Euler step; FMLM (stage 2), the student's softmax f(z, t_i, t_{i+1}); FLM stage 1,
    the teacher's posterior (wrap the teacher: the student's g is a velocity correction, not
    a distribution); MDLM, the unmasking distribution p(x_0 | x_t); AR, the next-token
    softmax; the exact denoiser, its posterior. Argmax steps are unchanged (T > 0), and at
    T = 1 the logits are returned as they are (same samples as the bare network).
    """

    def __init__(self, network: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"a softmax temperature must be > 0, got {temperature}")
        self.network = network
        self.temperature = float(temperature)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (``network``)
        except AttributeError:
            if name == "network":
                raise
            return getattr(self.network, name)

    def features(self, h: torch.Tensor, t: torch.Tensor, t2: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, Any]:
        return self.network.features(h, t, t2)

    def head(self, hidden: torch.Tensor, c: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped head's logits / T, same shape."""
        logits = self.network.head(hidden, c, **kwargs)
        return logits if self.temperature == 1.0 else logits / self.temperature

    def denoised(self, hidden: torch.Tensor, c: Any, project: bool = True,
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The samplers' x1 prediction through E (models/dit.py ``denoised``) from the tempered
        logits: ``(softmax(f / T) @ E, argmax f)``; at T = 1 the wrapped network's own."""
        if self.temperature == 1.0:
            return self.network.denoised(hidden, c, project)
        logits = self.head(hidden, c)
        tokens = logits.argmax(dim=-1)
        if not project:
            return None, tokens
        p = softmax_wide(logits)
        with torch.autocast(device_type=p.device.type, enabled=False):
            return self.network.project(p), tokens

    def forward(self, h: torch.Tensor | Callable[[Any], torch.Tensor], t: torch.Tensor,
                t2: torch.Tensor | None = None) -> torch.Tensor:
        if callable(h):
            h = h(self)
        hidden, c = self.features(h, t, t2)
        return self.head(hidden, c)


def prediction_network_slot(module: Any) -> tuple[dict, str]:
    """(container, key) of the network whose softmax a module's sampler draws from: the first
    of ``module.sampling_networks()`` (the backbone; FLM stage 1: its FLM teacher) or, for the
    exact-denoiser sampler (algo/oracle.OracleSampler), ``module.denoiser``."""
    if hasattr(module, "sampling_networks"):
        target = module.sampling_networks()[0]
    else:
        target = module.denoiser
    for container in (module._modules, getattr(module, "_teachers", {})):
        for key, value in container.items():
            if value is target:
                return container, key
    raise ValueError(f"{type(module).__name__}: its sampling network is neither a submodule "
                     "nor a teacher, so no wrapper can be put in its place")


@contextlib.contextmanager
def swapped_prediction_network(module: Any, wrap: Callable[[torch.nn.Module], torch.nn.Module],
                               ) -> Iterator[torch.nn.Module]:
    """Inside the block the module's prediction network (``prediction_network_slot``) is
    ``wrap(network)``; the network is put back on exit, also after an error."""
    container, key = prediction_network_slot(module)
    network = container[key]
    wrapper = wrap(network)
    container[key] = wrapper
    try:
        yield wrapper
    finally:
        container[key] = network
