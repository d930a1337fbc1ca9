"""EMA with the decay warm-up of the paper's code, against a direct float64 loop."""

import logging

import torch

from models.ema import EMA


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
