"""The algorithm registry (flow/registry.py) is where a module's loss and sampler come from:
pointing an entry at another function changes what training and sampling run, with no other
edit. Each test swaps one entry for a recording stand-in and checks it ran with the module's
own arguments and that its result is what the module returns."""

import dataclasses

import torch

import algo
from algo.config import resolve_config
from flow.sampling import sample_euler
from tests.helpers import compose_config

VOCAB = 16


def _flm() -> algo.FLM:
    config = resolve_config(compose_config(["model=tiny", "model.length=8",
                                            "loader.global_batch_size=4"]))
    torch.manual_seed(0)
    return algo.FLM(config, vocab_size=VOCAB)


def test_flm_training_loss_comes_from_the_registry_entry():
    module = _flm()
    batch = {"input_ids": torch.randint(0, VOCAB, (4, 8)),
             "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    calls = []

    def stand_in(network, noisy, t, tokens, mask, log_weight):
        calls.append((network, tokens, mask, log_weight))
        return t.sum() * 0 + 1.25  # a value no real loss gives here

    original = module.compute_loss(batch, step=0, batch_idx=0)
    module.spec = dataclasses.replace(module.spec, loss=stand_in)
    swapped = module.compute_loss(batch, step=0, batch_idx=0)
    assert len(calls) == 1
    network, tokens, mask, log_weight = calls[0]
    assert network is module.backbone and log_weight is None
    assert torch.equal(tokens, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    assert float(swapped) == 1.25 and float(original) != 1.25


def test_flm_sampler_comes_from_the_registry_entry():
    module = _flm().eval()
    calls = []

    def stand_in(network, table, noise, steps, denominator_eps, **kwargs):
        calls.append((network, steps, noise.shape))
        return sample_euler(network, table, noise, steps, denominator_eps, **kwargs) * 0 + 3

    generator = torch.Generator().manual_seed(0)
    plain = module.generate(2, 4, generator)
    module.spec = dataclasses.replace(module.spec, sampler=stand_in)
    swapped = module.generate(2, 4, torch.Generator().manual_seed(0))
    assert [(c[0], c[1]) for c in calls] == [(module.backbone, 4)]
    assert calls[0][2][:2] == (2, 8)  # (B, L, ·) initial state
    assert bool((swapped == 3).all()) and not bool((plain == 3).all())
