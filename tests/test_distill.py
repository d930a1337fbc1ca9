"""Distillation modules end to end on the CPU: FLM -> stage 1 -> stage 2 (docs/math.md §5-6)."""

import logging

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

import algo
from flow.registry import algorithm
from runtime.checkpointing import load_checkpoint_file
from runtime.config import ConfigError, resolve_config
from tests.helpers import compose_config, total_variation

VOCAB, LENGTH = 4, 2
SUPPORT = torch.cartesian_prod(*[torch.arange(VOCAB)] * LENGTH)  # (V^L, L), lexicographic


def source_probs() -> torch.Tensor:
    """An uneven law over V^L sequences with correlated positions and a few impossible ones."""
    probs = torch.rand(VOCAB ** LENGTH, generator=torch.Generator().manual_seed(0)) ** 3
    probs[::5] = 0.0
    return probs / probs.sum()


class KnownSource(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        idx = torch.multinomial(source_probs(), n, replacement=True,
                                generator=torch.Generator().manual_seed(seed))
        self.data = SUPPORT[idx]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long)}


def tiny_config(algo_name: str, **extra):
    overrides = [f"algo={algo_name}", f"model.length={LENGTH}", "model.hidden_size=32",
                 "model.n_heads=2", "model.cond_dim=32", "loader.global_batch_size=64",
                 "lr_scheduler.num_warmup_steps=10", "optim.lr=3e-3", "training.ema=0.9",
                 "trainer.max_steps=300"] + [f"{k}={v}" for k, v in extra.items()]
    return resolve_config(compose_config(overrides))


def stage_config(name: str, paths) -> DictConfig:
    """The config of one stage; built once the previous stages' checkpoints exist
    (resolve_config checks that teacher files are there)."""
    if name == "flm":
        return tiny_config("flm")
    if name == "flm_distill":
        return tiny_config("flm_distill", **{"algo.teacher_path": paths["flm"],
                                             "algo.boundary_prob": 4, "trainer.max_steps": 150})
    return tiny_config("flm_distill_second", **{"algo.teacher_f_path": paths["flm"],
                                                "algo.teacher_g_path": paths["flm_distill"],
                                                "algo.boundary_prob": 4,
                                                "trainer.max_steps": 150})


def trainer(max_steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      gradient_clip_val=1.0, enable_model_summary=False)


def loader() -> DataLoader:
    return DataLoader(KnownSource(64 * 400, 1), batch_size=64, shuffle=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Train each stage on the previous one's checkpoint; modules, checkpoints, configs."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("distill")
    paths = {name: str(root / f"{name}.ckpt") for name in algo.ALGORITHMS}
    configs, modules = {}, {}
    for name in ("flm", "flm_distill", "flm_distill_second"):
        configs[name] = stage_config(name, paths)
        pl.seed_everything(0)
        module = algo.algorithm_class(name)(configs[name], vocab_size=VOCAB)
        if name == "flm_distill":
            teacher_before = {k: v.clone() for k, v in module.teacher("flm").state_dict().items()}
        fit = trainer(configs[name].trainer.max_steps)
        fit.fit(module, loader())
        fit.save_checkpoint(paths[name])
        modules[name] = module.eval()
    return {"modules": modules, "paths": paths, "configs": configs,
            "stage_one_teacher_before": teacher_before}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_student_initialisation_from_the_teacher(pipeline):
    configs = pipeline["configs"]
    flm_state = load_checkpoint_file(pipeline["paths"]["flm"])["ema"]["shadow"]
    for name, zeroed in (("flm_distill", ("second_time_embedding.mlp.2.", "output_layer.linear.",
                                          "output_layer.modulation.")),
                         ("flm_distill_second", ("second_time_embedding.mlp.2.",))):
        module = algo.algorithm_class(name)(configs[name], vocab_size=VOCAB)
        for key, value in module.backbone.state_dict().items():
            if key.startswith(zeroed):
                assert not value.any(), key
            elif key in flm_state:
                assert torch.equal(value, flm_state[key]), key
            else:  # only the second embedding's fresh first layer has no teacher counterpart
                assert key.startswith("second_time_embedding.mlp.0."), key
        assert _same_state(module.ema.shadow, dict(module.backbone.named_parameters()))
    # stage 2 starts as the teacher itself: same logits on the same input
    module = algo.FLMDistillSecond(configs["flm_distill_second"], vocab_size=VOCAB)
    teacher = module.teacher("flm")
    h = torch.randn(3, LENGTH, 32)
    t = torch.rand(3)
    torch.testing.assert_close(module.backbone(h, t, torch.rand(3)), teacher(h, t))


def test_teachers_stay_frozen_and_out_of_checkpoints(pipeline):
    stage_one = pipeline["modules"]["flm_distill"]
    teacher = stage_one.teacher("flm")
    assert _same_state(teacher.state_dict(), pipeline["stage_one_teacher_before"])
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in stage_one.parameters()}
    for name in ("flm_distill", "flm_distill_second"):
        module = pipeline["modules"][name]
        ckpt = load_checkpoint_file(pipeline["paths"][name])
        weighting = module.loss_weighting  # stage 2 has none (its loss is unweighted)
        expected = set(module.backbone.state_dict()) | set(
            weighting.state_dict() if weighting is not None else {})
        saved = {k.split(".", 1)[1] for k in ckpt["state_dict"]}
        assert saved == expected, saved ^ expected
        assert set(ckpt["ema"]["shadow"]) == {n for n, _ in module.backbone.named_parameters()}
        saved_elements = sum(v.numel() for v in ckpt["state_dict"].values())
        own_elements = sum(v.numel() for v in module.state_dict().values())
        assert saved_elements == own_elements


def test_resume_keeps_the_checkpoint_student(pipeline):
    for name in ("flm_distill", "flm_distill_second"):
        path = pipeline["paths"][name]
        ckpt = load_checkpoint_file(path)
        module = algo.algorithm_class(name)(pipeline["configs"][name], vocab_size=VOCAB)
        fresh = module.state_dict()
        assert not _same_state(fresh, {k: v for k, v in ckpt["state_dict"].items()})
        trainer(ckpt["global_step"]).fit(module, loader(), ckpt_path=path)
        assert _same_state(module.state_dict(), ckpt["state_dict"])
        assert _same_state(module.ema.shadow, ckpt["ema"]["shadow"])


def test_samples_and_fmlm_one_step_beats_flm_one_step(pipeline):
    probs = source_probs()
    n = 3000
    tv = {}
    for name, module in pipeline["modules"].items():
        with module.ema.swapped_in(module.backbone):
            for steps in (1, 2):
                samples = module.generate(n, steps, torch.Generator().manual_seed(steps))
                assert samples.shape == (n, LENGTH) and samples.dtype == torch.long
                assert int(samples.min()) >= 0 and int(samples.max()) < VOCAB
                tv[name, steps] = total_variation(samples, probs, VOCAB)
    # FLM's one Euler step is the product of per-position modes; the flow maps move noise
    # to data in one step (sampling error at n=3000 over 16 outcomes is ~0.02-0.03)
    assert tv["flm_distill_second", 1] < 0.6 * tv["flm", 1], tv
    assert tv["flm_distill", 1] < 0.6 * tv["flm", 1], tv
    assert algo.FLMDistill.spec.network_calls_per_step == 2
    assert algo.FLMDistillSecond.spec.network_calls_per_step == 1


def test_dspace_and_reference_training_paths_agree_on_average(pipeline):
    """Same module, both input paths, many validation draws: equal expected loss."""
    DRAWS = 10  # noqa: N806
    configs = pipeline["configs"]
    for name in ("flm_distill", "flm_distill_second"):
        module = pipeline["modules"][name]
        batch = next(iter(DataLoader(KnownSource(128, 5), batch_size=128)))
        losses = {}
        for path in ("dspace", "reference"):
            module.config = tiny_config(name, **{k: v for k, v in {
                "algo.teacher_path": configs[name].algo.get("teacher_path"),
                "algo.teacher_f_path": configs[name].algo.get("teacher_f_path"),
                "algo.teacher_g_path": configs[name].algo.get("teacher_g_path"),
                "training.input_path": path}.items() if v is not None})
            module.objective = algorithm(name).loss_for(path)  # fixed at construction
            with torch.no_grad():
                draws = [float(module.compute_loss(batch, step=-1 - i, batch_idx=0))
                         for i in range(DRAWS)]
            losses[path] = torch.tensor(draws)
        module.config = configs[name]
        module.objective = algorithm(name).loss_for(configs[name].training.input_path)
        diff = losses["dspace"].mean() - losses["reference"].mean()
        spread = (losses["dspace"].var() / DRAWS + losses["reference"].var() / DRAWS).sqrt()
        assert diff.abs() < 5 * spread + 1e-6, (name, losses)


def test_configuration_errors_name_the_key(pipeline, tmp_path):
    paths = pipeline["paths"]
    with pytest.raises(ConfigError, match="algo.teacher_path is not set"):
        algo.FLMDistill(tiny_config("flm_distill"), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="algo.teacher_path=.*no such file"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path": tmp_path / "x"}),
                        vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="algo.teacher_path=.*algo=flm_distill"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path":
                                                       paths["flm_distill"]}), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="model.hidden_size: teacher 32 vs student 64"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path": paths["flm"],
                                                      "model.hidden_size": 64}), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="model.length: teacher 2 vs student 4"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path": paths["flm"],
                                                      "model.length": 4}), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="vocabulary of 4 tokens.*has 5"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path": paths["flm"]}),
                        vocab_size=VOCAB + 1)
    with pytest.raises(ConfigError, match="algo.teacher_g_path is not set"):
        algo.FLMDistillSecond(tiny_config("flm_distill_second",
                                          **{"algo.teacher_f_path": paths["flm"]}),
                              vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="double_temb=true"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path": paths["flm"],
                                                      "algo.double_temb": "false"}),
                        vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="algo.boundary_prob=0.5 must be >= 1"):
        algo.FLMDistill(tiny_config("flm_distill", **{"algo.teacher_path": paths["flm"],
                                                      "algo.boundary_prob": 0.5}),
                        vocab_size=VOCAB)
