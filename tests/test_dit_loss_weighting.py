"""Distillation loss weighting as in the paper's algo.py: stage 1 weights by w(s) (its
weighting module ignores the end time), stage 2's loss is unweighted."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import algo
from flow.flow_map import Interval, flow_map_matching_loss
from models.dit import DiT
from models.load import upstream_name
from runtime.config import resolve_config
from tests.helpers import compose_config

V, L, D, HEADS, COND = 6, 4, 32, 2, 32


def model_overrides():
    return [f"model.length={L}", f"model.hidden_size={D}", f"model.n_heads={HEADS}",
            f"model.cond_dim={COND}", "loader.global_batch_size=4"]


def hub_teacher(folder, double_temb: bool, algo_name: str, seed: int) -> str:
    """A paper-format Hugging Face folder of a random backbone."""
    torch.manual_seed(seed)
    net = DiT(V, L, D, 2, HEADS, COND, double_temb=double_temb)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    weights = {upstream_name(k): v.contiguous() for k, v in net.state_dict().items()}
    hd = D // HEADS
    weights["rotary_emb.inv_freq"] = 1.0 / 10_000 ** (torch.arange(0, hd, 2).float() / hd)
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"vocab_size": V, "model": {"length": L, "n_heads": HEADS},
         "algo": {"name": algo_name, "double_temb": double_temb}}))
    return str(folder)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"flm": hub_teacher(root / "flm", False, "flm", 0),
            "map": hub_teacher(root / "map", True, "flm_semigroup_distill", 1)}


def test_stage_one_weight_is_a_function_of_s_alone(teachers):
    config = resolve_config(compose_config(model_overrides() + [
        "algo=flm_distill", f"algo.teacher_path={teachers['flm']}",
        "algo.learnable_loss_weighting=true"]))
    module = algo.FLMDistill(config, vocab_size=V)
    torch.nn.init.normal_(module.loss_weighting.mlp[-1].weight)
    torch.nn.init.normal_(module.loss_weighting.mlp[-1].bias)
    per_token = torch.rand(3, L, dtype=torch.float64)
    mask = torch.ones(3, L)
    s = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    with torch.no_grad():
        a = module.reduce(per_token, Interval.from_endpoints(module.table, s, s + 0.05), mask)
        b = module.reduce(per_token, Interval.from_endpoints(module.table, s, s + 0.6), mask)
        c = module.reduce(per_token, Interval.from_endpoints(module.table, s + 0.3, s + 0.6),
                          mask)
        w = module.loss_weighting(s.float()).double()[:, None]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.double(), (torch.exp(-w) * per_token + w).mean(), rtol=1e-5,
                               atol=1e-6)
    assert (a - c).abs() > 1e-4  # the weight does depend on s


def test_stage_two_loss_ignores_the_weighting(teachers, caplog):
    config = resolve_config(compose_config(model_overrides() + [
        "algo=flm_distill_second", f"algo.teacher_f_path={teachers['flm']}",
        f"algo.teacher_g_path={teachers['map']}", "algo.learnable_loss_weighting=true"]))
    with caplog.at_level(logging.WARNING):
        module = algo.FLMDistillSecond(config, vocab_size=V)
    assert "no effect in stage 2" in caplog.text
    assert module.loss_weighting is None
    tokens = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, L, dtype=torch.long)
    mask[0, -1] = 0
    with torch.no_grad():
        loss = module.compute_loss({"input_ids": tokens, "attention_mask": mask}, 3, 0)
        interval = module.draw_interval(4, 3, 0)
        networks = [module.teacher("flm"), module.teacher("map"), module.backbone]
        per_token = flow_map_matching_loss(*networks, tokens, interval,
                                           module._noise(networks, tokens, 3, 0))
    expected = (per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
