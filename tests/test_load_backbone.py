"""Loading the paper's checkpoints (Lightning .ckpt and Hugging Face folders) and ours.

The paper-layout checkpoints are written here from its key list with random weights,
and the forward is checked against a float64 re-computation written from the paper's
conventions (raw-t time features, summed time embeddings, half-split rotary, softcap 50),
not by calling our modules.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.load import load_backbone
from runtime.config import ConfigError
from tests.helpers import compose_config

V, D, HEADS, COND, BLOCKS, L = 50, 64, 4, 32, 2, 16
MLP = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
# our name -> the paper's, written out (not taken from models/load.py)
OURS_TO_PAPER = {"input_embedding": "vocab_embed.embedding",
                 **{f"time_embedding.{n}": f"sigma_map.{n}" for n in MLP},
                 **{f"second_time_embedding.{n}": f"sigma_map_prime.{n}" for n in MLP},
                 "output_layer.norm.weight": "output_layer.norm_final.weight",
                 "output_layer.linear.weight": "output_layer.linear.weight",
                 "output_layer.linear.bias": "output_layer.linear.bias",
                 "output_layer.modulation.weight": "output_layer.adaLN_modulation.weight",
                 "output_layer.modulation.bias": "output_layer.adaLN_modulation.bias"}
for _i in range(BLOCKS):
    for _ours, _paper in [("norm1.weight", "norm1.weight"), ("qkv.weight", "attn_qkv.weight"),
                          ("attn_out.weight", "attn_out.weight"), ("norm2.weight", "norm2.weight"),
                          *[(n, n) for n in MLP], ("modulation.weight", "adaLN_modulation.weight"),
                          ("modulation.bias", "adaLN_modulation.bias")]:
        OURS_TO_PAPER[f"blocks.{_i}.{_ours}"] = f"blocks.{_i}.{_paper}"


def paper_params(double_temb: bool, loss_weighting: bool, vocab: int = V,
                 ) -> list[tuple[str, tuple]]:
    """The paper's DIT trainable parameters, in its named_parameters() order, with shapes."""
    temb = [("mlp.0.weight", (COND, 256)), ("mlp.0.bias", (COND,)),
            ("mlp.2.weight", (COND, COND)), ("mlp.2.bias", (COND,))]
    out = [("vocab_embed.embedding", (vocab, D))] + [(f"sigma_map.{n}", s) for n, s in temb]
    if double_temb:
        out += [(f"sigma_map_prime.{n}", s) for n, s in temb]
    if loss_weighting:
        out += [(f"learnable_loss_weighting.s_embed.{n}", s) for n, s in temb]
        out += [("learnable_loss_weighting.mlp.0.weight", (128, COND)),
                ("learnable_loss_weighting.mlp.0.bias", (128,)),
                ("learnable_loss_weighting.mlp.2.weight", (1, 128)),
                ("learnable_loss_weighting.mlp.2.bias", (1,))]
    for i in range(BLOCKS):
        out += [(f"blocks.{i}.norm1.weight", (D,)), (f"blocks.{i}.attn_qkv.weight", (3 * D, D)),
                (f"blocks.{i}.attn_out.weight", (D, D)), (f"blocks.{i}.norm2.weight", (D,)),
                (f"blocks.{i}.mlp.0.weight", (4 * D, D)), (f"blocks.{i}.mlp.0.bias", (4 * D,)),
                (f"blocks.{i}.mlp.2.weight", (D, 4 * D)), (f"blocks.{i}.mlp.2.bias", (D,)),
                (f"blocks.{i}.adaLN_modulation.weight", (6 * D, COND)),
                (f"blocks.{i}.adaLN_modulation.bias", (6 * D,))]
    out += [("output_layer.norm_final.weight", (D,)),
            ("output_layer.linear.weight", (vocab, D)), ("output_layer.linear.bias", (vocab,)),
            ("output_layer.adaLN_modulation.weight", (2 * D, COND)),
            ("output_layer.adaLN_modulation.bias", (2 * D,))]
    return out


def random_weights(double_temb: bool, loss_weighting: bool, seed: int, vocab: int = V) -> dict:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in paper_params(double_temb, loss_weighting, vocab):
        scale = 1.0 if "attn_qkv" in name else 0.3  # large q/k: logits beyond the softcap
        weights[name] = torch.randn(shape, generator=g) * scale
        if "norm" in name:
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
    hd = D // HEADS
    weights["rotary_emb.inv_freq"] = 1.0 / 10_000 ** (torch.arange(0, hd, 2).float() / hd)
    return weights


def paper_checkpoint(tmp_path, double_temb=True, loss_weighting=True, algo="flm_distill_double",
                     name="paper.ckpt", vocab=V):
    live = random_weights(double_temb, loss_weighting, 0, vocab)
    shadow = random_weights(double_temb, loss_weighting, 1, vocab)
    order = [n for n, _ in paper_params(double_temb, loss_weighting, vocab)]
    state = {f"backbone.{k}": v for k, v in live.items()}
    # a torch.compile'd key and a teacher key, as the paper's checkpoints may hold
    state["backbone.blocks.0._orig_mod.attn_out.weight"] = state.pop(
        "backbone.blocks.0.attn_out.weight")
    state["teacher_model.vocab_embed.embedding"] = torch.zeros(vocab, D)
    ckpt = {"state_dict": state, "global_step": 7,
            "ema": {"decay": 0.9999, "num_updates": 7, "shadow_params": [shadow[n] for n in order]},
            "hyper_parameters": {"config": OmegaConf.create(
                {"model": {"length": L, "n_heads": HEADS, "dropout": 0.1},
                 "algo": {"name": algo, "double_temb": double_temb}}), "vocab_size": None}}
    path = tmp_path / name
    torch.save(ckpt, path)
    return path, live, shadow


# ---- the paper's forward, float64, from its conventions ------------------------------------
def reference_logits(w: dict, z, t, t2=None, softcap=50.0, time_scale=1.0, interleaved=False):
    w = {k: v.double() for k, v in w.items()}
    h = z.double() @ w["vocab_embed.embedding"]

    def temb(prefix, time):
        j = torch.arange(128, dtype=torch.float64)
        args = time_scale * time.double()[:, None] * torch.exp(-math.log(10_000) * j / 128)
        feat = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        x = F.silu(feat @ w[f"{prefix}.mlp.0.weight"].T + w[f"{prefix}.mlp.0.bias"])
        return x @ w[f"{prefix}.mlp.2.weight"].T + w[f"{prefix}.mlp.2.bias"]

    c = temb("sigma_map", t)
    if t2 is not None:  # the paper's DIT: sigma_map_prime when it has one, else sigma_map
        c = c + temb("sigma_map_prime" if "sigma_map_prime.mlp.0.weight" in w else "sigma_map", t2)
    c = F.silu(c)
    hd, length = D // HEADS, h.shape[1]
    angles = torch.outer(torch.arange(length, dtype=torch.float64),
                         10_000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    turn = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # (1, L, 1, hd/2)

    def rotate(x):  # (B, L, H, hd): complex pairs (j, j + hd/2), or (2j, 2j+1) if interleaved
        if interleaved:
            pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * turn
            return torch.view_as_real(pairs).flatten(-2)
        pairs = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * turn
        return torch.cat([pairs.real, pairs.imag], dim=-1)

    def norm(x, weight):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * weight

    for i in range(BLOCKS):
        p = f"blocks.{i}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=-1))
        x = norm(h, w[p + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = (x @ w[p + "attn_qkv.weight"].T).unflatten(-1, (3, HEADS, hd))  # (three h d)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        a = torch.einsum("bhlm,bmhd->blhd", logits.softmax(-1), v).flatten(-2)
        h = h + g1 * (a @ w[p + "attn_out.weight"].T)
        x = norm(h, w[p + "norm2.weight"]) * (1 + sc2) + sh2
        x = F.gelu(x @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"], approximate="tanh")
        h = h + g2 * (x @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
    mod = c @ w["output_layer.adaLN_modulation.weight"].T + w["output_layer.adaLN_modulation.bias"]
    shift, scale = (m[:, None] for m in mod.chunk(2, dim=-1))
    x = norm(h, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return x @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]


def test_paper_checkpoint_loads_every_tensor_ema_by_order(tmp_path):
    path, live, shadow = paper_checkpoint(tmp_path)
    backbone, settings = load_backbone(path)
    state = backbone.state_dict()
    assert set(state) == set(OURS_TO_PAPER)
    for ours, paper in OURS_TO_PAPER.items():
        torch.testing.assert_close(state[ours], shadow[paper], rtol=0, atol=0, msg=ours)
    live_backbone, _ = load_backbone(path, use_ema=False)
    for ours, paper in OURS_TO_PAPER.items():
        torch.testing.assert_close(live_backbone.state_dict()[ours], live[paper], rtol=0, atol=0)
    assert (settings.vocab_size, settings.length, settings.hidden_size, settings.n_blocks,
            settings.n_heads, settings.cond_dim, settings.mlp_ratio) == (V, L, D, BLOCKS, HEADS,
                                                                         COND, 4)
    assert settings.double_temb and settings.algo == "flm_distill_second"
    assert settings.global_step == 7 and settings.attn_softcap == 50.0


# stored algo.name -> (our algo with one time embedding, with two); None: not knowable
STORED_NAMES = {"flm": ("flm", None),  # ours and the paper's
                "flm_distill_second": ("flm_distill_second", "flm_distill_second"),  # ours
                "flm_distill_double": ("flm_distill_second", "flm_distill_second"),  # the paper's
                "flm_semigroup_distill": ("flm_distill", "flm_distill"),  # the paper's
                "flm_consistency_v2": ("flm", None)}  # an flm-family name nobody knows
TWO_TIME = ("flm_distill", "flm_distill_second")


@pytest.mark.parametrize("two_embeddings", [False, True])
@pytest.mark.parametrize("name", list(STORED_NAMES))
def test_architecture_from_the_weights_forward_float64(tmp_path, caplog, name, two_embeddings):
    """Every stored name x one or two time embeddings loads, built from the weights, and
    computes the paper's forward: two embeddings sum sigma_map(t) and sigma_map_prime(t2);
    one embedding in a two-time algorithm sums sigma_map(t) and sigma_map(t2), as the paper's
    DIT does with double_temb=false; in FLM it embeds t alone."""
    path, _, shadow = paper_checkpoint(tmp_path, two_embeddings, loss_weighting=False,
                                       algo=name)
    with caplog.at_level("INFO", logger="models.load"):
        backbone, settings = load_backbone(path)
    algo = STORED_NAMES[name][two_embeddings]
    assert settings.algo == algo
    two_times = two_embeddings or algo in TWO_TIME
    assert settings.double_temb == backbone.double_temb == two_times
    assert settings.shared_time_embedding == (two_times and not two_embeddings)
    noted = [r.getMessage() for r in caplog.records if f"algo.name={name}" in r.getMessage()]
    disagrees = name == "flm_consistency_v2" or (name == "flm" and two_embeddings)
    assert len(noted) == disagrees, noted  # one log line where the name is unknown or disagrees
    backbone = backbone.double()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, L, V, generator=g, dtype=torch.float64)
    t, t2 = torch.rand(2, generator=g), torch.rand(2, generator=g)
    second = t2 if two_times else None
    ours = backbone.logits_from_state(z, t, second)
    expected = reference_logits(shadow, z, t, second)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the test tells the conventions apart: each alternative moves the logits well beyond that
    alternatives = [dict(softcap=None), dict(time_scale=1000.0), dict(interleaved=True)]
    for alternative in alternatives:
        other = reference_logits(shadow, z, t, second, **alternative)
        assert (other - expected).abs().max() > 1e-2, alternative
    if two_times:  # the second time matters: t2 ignored is another network
        assert (reference_logits(shadow, z, t) - expected).abs().max() > 1e-2


def test_caller_algo_decides_what_the_weights_leave_open(tmp_path, caplog):
    # an unknown stored name, one embedding: the caller's two-time algorithm runs it as the
    # paper's double_temb=false map; a known stored name wins over the caller's (logged)
    path, _, shadow = paper_checkpoint(tmp_path, False, loss_weighting=False,
                                       algo="flm_consistency_v2")
    backbone, settings = load_backbone(path, algo="flm_distill")
    assert settings.algo == "flm_distill" and settings.shared_time_embedding
    z = torch.randn(2, L, V, dtype=torch.float64)
    t, t2 = torch.rand(2), torch.rand(2)
    torch.testing.assert_close(backbone.double().logits_from_state(z, t, t2),
                               reference_logits(shadow, z, t, t2), rtol=1e-5, atol=1e-5)
    path, _, _ = paper_checkpoint(tmp_path, True, loss_weighting=False, algo="flm_distill_double",
                                  name="fmlm.ckpt")
    with caplog.at_level("INFO", logger="models.load"):
        _, settings = load_backbone(path, algo="flm_distill")
    assert settings.algo == "flm_distill_second"
    assert any("not algo=flm_distill" in r.getMessage() for r in caplog.records)
    # two embeddings, stored one-time name: the caller's two-time algorithm, else not knowable
    path, _, _ = paper_checkpoint(tmp_path, True, loss_weighting=False, algo="flm",
                                  name="two.ckpt")
    assert load_backbone(path, algo="flm_distill_second")[1].algo == "flm_distill_second"
    assert load_backbone(path, algo="flm")[1].algo is None


def test_wrong_shape_or_missing_key_is_one_clear_error(tmp_path):
    path, _, _ = paper_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"]["backbone.blocks.1.attn_out.weight"] = torch.zeros(D, D + 1)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match=r"blocks\.1\.attn_out\.weight.*\(64, 65\).*\(64, 64\)"):
        load_backbone(tmp_path / "bad.ckpt", use_ema=False)
    with pytest.raises(ConfigError, match=r"EMA entry for blocks\.1\.attn_out\.weight"):
        load_backbone(tmp_path / "bad.ckpt")
    ckpt = torch.load(path, weights_only=False)
    del ckpt["state_dict"]["backbone.output_layer.linear.bias"]
    torch.save(ckpt, tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match=r"output_layer\.linear\.bias.*missing"):
        load_backbone(tmp_path / "missing.ckpt", use_ema=False)
    ckpt = torch.load(path, weights_only=False)
    ckpt["ema"]["shadow_params"].pop(0)
    torch.save(ckpt, tmp_path / "short.ckpt")
    with pytest.raises(ConfigError, match="EMA list holds"):
        load_backbone(tmp_path / "short.ckpt")


def test_hub_folder_loads(tmp_path):
    weights = random_weights(True, False, 5)
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": V}))
    with pytest.raises(ConfigError, match="does not record its sequence length"):
        load_backbone(folder)
    backbone, settings = load_backbone(folder, length=L)
    for ours, paper in OURS_TO_PAPER.items():
        torch.testing.assert_close(backbone.state_dict()[ours], weights[paper], rtol=0, atol=0)
    assert settings.algo is None and settings.double_temb and settings.length == L
    # a flattened Hydra config, as PyTorchModelHubMixin writes from a dict config
    (folder / "config.json").write_text(json.dumps(
        {"vocab_size": V, "model": {"length": 8, "n_heads": HEADS},
         "algo": {"name": "flm_distill_double"}}))
    _, settings = load_backbone(folder)
    assert settings.length == 8 and settings.algo == "flm_distill_second"


def test_hub_repo_id_offline_names_the_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'nobody-here/no_such_model' could not be fetched"):
        load_backbone("nobody-here/no_such_model", what="eval.checkpoint_path")


def test_not_a_checkpoint_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty is a directory without config.json"):
        load_backbone(tmp_path / "empty", what="eval.checkpoint_path")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "tensors.pt")
    with pytest.raises(ConfigError, match=r"tensors.pt is a torch file but not a training"):
        load_backbone(tmp_path / "tensors.pt")
    (tmp_path / "config.yaml").write_text("model:\n  length: 16\n")
    with pytest.raises(ConfigError, match=r"config.yaml is a YAML/text file, not a checkpoint") \
            as err:
        load_backbone(tmp_path / "config.yaml")
    assert "delete" not in str(err.value)
    assert (tmp_path / "config.yaml").is_file()


def project_checkpoint(tmp_path, drop_softcap=False):
    config = compose_config(["model.length=16", "model.hidden_size=64", "model.n_heads=4",
                             "model.cond_dim=32"])
    from models.dit import build_backbone
    torch.manual_seed(0)
    live = build_backbone(config.model, V, False)
    shadow = {n: torch.randn_like(p) for n, p in live.named_parameters()}
    saved = OmegaConf.to_container(config, resolve=False)
    saved["checkpointing"] = saved["eval"] = saved["hydra"] = None
    if drop_softcap:
        del saved["model"]["attn_softcap"]
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in live.state_dict().items()},
            "ema": {"decay": 0.9, "num_updates": 3, "shadow": shadow}, "global_step": 3,
            "hyper_parameters": {"config": saved, "vocab_size": V}}
    torch.save(ckpt, tmp_path / "ours.ckpt")
    return tmp_path / "ours.ckpt", live, shadow


def test_project_checkpoint_loads_ema(tmp_path):
    path, live, shadow = project_checkpoint(tmp_path)
    backbone, settings = load_backbone(path)
    for name, value in shadow.items():
        torch.testing.assert_close(backbone.state_dict()[name], value, rtol=0, atol=0)
    live_backbone, _ = load_backbone(path, use_ema=False)
    for name, value in live.state_dict().items():
        torch.testing.assert_close(live_backbone.state_dict()[name], value, rtol=0, atol=0)
    assert settings.source == "project" and settings.algo == "flm" and settings.length == 16


def test_project_checkpoint_before_parity_is_refused(tmp_path):
    path, _, _ = project_checkpoint(tmp_path, drop_softcap=True)
    with pytest.raises(ConfigError, match="before the backbone followed the paper's conventions"):
        load_backbone(path)


def test_eval_loads_paper_checkpoints(tmp_path):
    import main
    from runtime.config import resolve_config
    vocab = 2048  # the embedded corpus' tokenizer (data=embedded, the default)
    path, _, shadow = paper_checkpoint(tmp_path, double_temb=False, loss_weighting=True,
                                       algo="flm", vocab=vocab)
    base = ["mode=sample_eval", "model.length=8"]
    config = resolve_config(compose_config(base + [f"eval.checkpoint_path={path}"]))
    module, _ = main.load_for_eval(config)
    assert module.config.algo.name == "flm" and module.config.model.length == L
    assert module.config.model.attn_softcap == 50.0 and module.config.model.hidden_size == D
    torch.testing.assert_close(module.backbone.output_layer.linear.weight.detach().cpu(),
                               shadow["output_layer.linear.weight"], rtol=0, atol=0)
    tokens = module.generate(2, 2, torch.Generator(device=module.device).manual_seed(0))
    assert tokens.shape == (2, L)
    # a stage-2 map with one time embedding (the paper's double_temb=false): two times
    path, _, shadow = paper_checkpoint(tmp_path, double_temb=False, loss_weighting=False,
                                       algo="flm_distill_double", name="shared.ckpt", vocab=vocab)
    config = resolve_config(compose_config(base + [f"eval.checkpoint_path={path}"]))
    module, _ = main.load_for_eval(config)
    assert module.config.algo.name == "flm_distill_second" and module.sampler_two_times
    for layer in ("time_embedding", "second_time_embedding"):
        torch.testing.assert_close(getattr(module.backbone, layer).mlp[0].weight.detach().cpu(),
                                   shadow["sigma_map.mlp.0.weight"], rtol=0, atol=0)
    # an FMLM Hub folder that does not say its stage: the config's algo decides; sample_eval of
    # stage 2 needs no teachers
    folder = tmp_path / "fmlm"
    folder.mkdir()
    save_file(random_weights(True, False, 2, vocab), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    config = resolve_config(compose_config(base + [f"eval.checkpoint_path={folder}"]))
    with pytest.raises(ConfigError, match="pass algo=flm_distill_second"):
        main.load_for_eval(config)
    config = resolve_config(compose_config(base + [f"eval.checkpoint_path={folder}",
                                                   "algo=flm_distill_second"]))
    module, _ = main.load_for_eval(config)
    assert module.sampler_two_times and module.config.model.length == 8
    tokens = module.generate(2, 1, torch.Generator(device=module.device).manual_seed(0))
    assert tokens.shape == (2, 8)
