"""EMA with the decay warm-up of the paper's code, against a direct float64 loop."""

import logging

import pytest
import torch

from models.ema import EMA
from speed import SpeedOptions, kernels


def test_warmup_matches_a_direct_float64_loop():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    decay = 0.99
    ema = EMA(net, decay)
    shadow = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    for n_update in range(1, 40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(decay, (1 + n_update) / (10 + n_update))
        for name, p in net.named_parameters():
            shadow[name] = d * shadow[name] + (1 - d) * p.detach().double()
    assert ema.num_updates == 39
    for name, value in shadow.items():
        torch.testing.assert_close(ema.shadow[name].double(), value, rtol=1e-5, atol=1e-6)


def test_num_updates_saved_and_old_states_take_the_global_step(caplog):
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, 0.9)
    ema.update(net)
    state = ema.state_dict()
    fresh = EMA(net, 0.9)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 1
    old = {"decay": 0.9, "shadow": state["shadow"]}
    with caplog.at_level(logging.WARNING):
        fresh.load_state_dict(old, global_step=123)
    assert fresh.num_updates == 123 and "without num_updates" in caplog.text
    fresh.load_state_dict(old)
    assert fresh.num_updates == 0


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``aten._local_scalar_dense``: ``.item()``,
    ``bool(t)``, a 0-d tensor passed where a number is expected); on a GPU each one waits for
    the device to finish its queue."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_device_skip_flag_is_applied_without_a_host_read():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.9)
    reference = EMA(net, 0.9)
    for skip in (False, True, False):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        with _HostReads() as mode:
            ema.update(net, skip=torch.tensor(skip))
        assert mode.reads == 0
        if skip:
            reference.num_updates += 1  # counted until the guard reads the flag (uncount)
        else:
            reference.update(net)  # the host-flag path: a second way to the same shadow
    for name, value in reference.shadow.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
def test_device_skip_update_compiled_is_the_eager_update():
    """With fused kernels on, the device-skip update on CUDA runs compiled
    (``speed.kernels.fused_lerp_towards``), against the plain update with the same flags. A
    changing decay (the warm-up) and the skip flag are device values of the compiled
    function, not constants of its graph: one graph serves every step."""
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)).cuda()
    eager = EMA(net, 0.95)
    compiled = EMA(net, 0.95, SpeedOptions(fused=True))
    torch._dynamo.reset()
    kernels._compiled_lerp.clear()
    dynamo_utils.counters.clear()
    for skip in (False, True, False, False):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        eager.update(net, skip=torch.tensor(skip, device="cuda"))
        compiled.update(net, skip=torch.tensor(skip, device="cuda"))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    for name, value in eager.shadow.items():
        torch.testing.assert_close(compiled.shadow[name], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(compiled.shadow["0.weight"], net[0].weight.detach())  # it averages
