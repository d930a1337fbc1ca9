"""The algorithms this project trains, each described once: its network, loss, sampler, the
strategies it may be sharded with, its teachers, and the check of its own settings.

Every other place asks here (``algorithm(config.algo.name)``): the Lightning modules
(algo/modules.py) call the loss and sampler named here, the config check runs ``check``,
teacher loading reads ``teachers``, checkpoint loading reads ``causal`` and ``two_times``.
To change an algorithm's loss or sampler, change its function in ``flow/`` or its entry below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from omegaconf import DictConfig

from flow.autoregressive import FIRST_TOKEN_MODES, next_token_nll, sample_autoregressive
from flow.flow_map import (
    flow_map_matching_loss,
    flow_map_matching_loss_reference,
    semigroup_loss,
    semigroup_loss_reference,
)
from flow.losses import denoiser_loss
from flow.masked import masked_diffusion_loss, sample_ancestral
from flow.path import INPUT_PATHS
from flow.sampling import sample_euler, sample_flow_map
from runtime.config import ConfigError


@dataclass(frozen=True)
class Teacher:
    """A frozen network an algorithm distils from: its name in the module, its config key
    (``algo.<key>``) and the algorithm its checkpoint must have been trained with."""

    name: str
    key: str
    algo: str


@dataclass(frozen=True)
class Algorithm:
    """What an algorithm is; ``check`` validates the settings it reads, before any work."""

    name: str
    two_times: bool  # the trained network takes (s, t): algo.double_temb must equal this
    causal: bool  # the network attends causally (next-token prediction)
    loss: Callable  # per-token loss (docs/math.md), as the module calls it
    sampler: Callable  # the sampler the module's generate runs
    strategies: tuple[str, ...]  # training strategies it may run under
    teachers: tuple[Teacher, ...] = ()
    sampling_teacher: str | None = None  # the teacher the sampler calls besides the network
    losses_by_input_path: Mapping[str, Callable] = field(default_factory=dict)
    extra_checks: tuple[Callable[[DictConfig], None], ...] = ()

    @property
    def network_calls_per_step(self) -> int:
        """Network calls per sampler step: the network, and the sampling teacher if any."""
        return 1 + (self.sampling_teacher is not None)

    @property
    def sampler_two_times(self) -> bool:
        """Whether the sampled network takes (t_i, t_{i+1}) itself (FMLM: p = softmax(f(z,
        t_i, t_{i+1}))), rather than correcting a teacher's velocity (stage 1)."""
        return self.two_times and self.sampling_teacher is None

    def loss_for(self, input_path: str) -> Callable:
        """The loss on ``training.input_path`` (distillation: the D-space loss or its
        materialised-noise twin); ``loss`` where the algorithm has one path."""
        return self.losses_by_input_path.get(input_path, self.loss)

    def check(self, config: DictConfig) -> None:
        """ConfigError naming the key for a setting of ``config.algo`` / ``training`` this
        algorithm cannot run with."""
        ac = config.algo
        if bool(ac.double_temb) != self.two_times:
            raise ConfigError(f"algo={self.name} needs algo.double_temb={str(self.two_times).lower()}"
                              f" (its network takes {'two times' if self.two_times else 'one time'})")
        if config.training.input_path not in INPUT_PATHS:
            raise ConfigError(f"training.input_path={config.training.input_path!r}; expected one "
                              f"of {list(INPUT_PATHS)}")
        strategy = config.strategy.name
        if config.get("mode", "train") == "train" and strategy not in self.strategies:
            raise ConfigError(
                f"strategy={strategy} supports algo={'|'.join(sharded_algorithms())}, not "
                f"algo={self.name}: the distillation losses read the student's embedding outside "
                "its forward, where FSDP holds only a shard of it; use strategy=ddp (the student "
                "and its frozen teachers fit on one GPU for DiT small/medium)")
        own = {t.key for t in self.teachers}
        for key in TEACHER_KEYS:
            if key not in own and ac.get(key):
                raise ConfigError(f"algo.{key} is set but algo={self.name} does not read it: "
                                  "remove the override")
        for check in self.extra_checks:
            check(config)


def _check_interval_draws(config: DictConfig) -> None:
    ac = config.algo
    if ac.add_boundary and not ac.boundary_prob >= 1:
        raise ConfigError(f"algo.boundary_prob={ac.boundary_prob} must be >= 1 (the interval "
                          "(0, 1) has probability 1/boundary_prob)")


def _check_no_loss_weighting(config: DictConfig) -> None:
    if config.algo.learnable_loss_weighting:
        raise ConfigError(f"algo.learnable_loss_weighting=true does not apply to "
                          f"algo={config.algo.name}: set algo.learnable_loss_weighting=false")


def _check_masked(config: DictConfig) -> None:
    ac = config.algo
    if not 0.0 <= float(ac.noise_eps) < 1.0:
        raise ConfigError(f"algo.noise_eps={ac.noise_eps} must lie in [0, 1)")
    if not float(config.training.t_min) > 0.0:
        raise ConfigError(
            f"training.t_min={config.training.t_min}: the MDLM loss weight 1/t is unbounded "
            "at t=0; use training.t_min=1e-3 (MDLM's sampling_eps, the algo=mdlm default)")
    if not 0.0 <= float(ac.sampling_t_final) < 1.0:
        raise ConfigError(f"algo.sampling_t_final={ac.sampling_t_final} must lie in [0, 1) "
                          "(MDLM samples down to 1e-5)")


def _check_first_token(config: DictConfig) -> None:
    mode = config.algo.first_token
    if mode not in FIRST_TOKEN_MODES:
        raise ConfigError(f"algo.first_token={mode!r}; expected one of {list(FIRST_TOKEN_MODES)}")


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    # cross-entropy denoiser on the one-hot flow (§3-4), Euler sampler (§4)
    Algorithm("flm", two_times=False, causal=False, loss=denoiser_loss,
              sampler=sample_euler, strategies=("ddp", "fsdp")),
    # stage 1: X = x + Δ·v_T + ½Δ²·g_θ (§5), sampled with the teacher's velocity
    Algorithm("flm_distill", two_times=True, causal=False, loss=semigroup_loss,
              sampler=sample_flow_map, strategies=("ddp",),
              teachers=(Teacher("flm", "teacher_path", "flm"),), sampling_teacher="flm",
              losses_by_input_path={"dspace": semigroup_loss,
                                    "reference": semigroup_loss_reference},
              extra_checks=(_check_interval_draws,)),
    # stage 2 (FMLM): one network regressed on the stage-1 map (§6), Euler with two times
    Algorithm("flm_distill_second", two_times=True, causal=False, loss=flow_map_matching_loss,
              sampler=sample_euler, strategies=("ddp",),
              teachers=(Teacher("flm", "teacher_f_path", "flm"),
                        Teacher("map", "teacher_g_path", "flm_distill")),
              losses_by_input_path={"dspace": flow_map_matching_loss,
                                    "reference": flow_map_matching_loss_reference},
              extra_checks=(_check_interval_draws,)),
    # masked diffusion (MDLM), ancestral sampler
    Algorithm("mdlm", two_times=False, causal=False, loss=masked_diffusion_loss,
              sampler=sample_ancestral, strategies=("ddp",),
              extra_checks=(_check_no_loss_weighting, _check_masked)),
    # next-token prediction with the same DiT under causal attention
    Algorithm("ar", two_times=False, causal=True, loss=next_token_nll,
              sampler=sample_autoregressive, strategies=("ddp",),
              extra_checks=(_check_no_loss_weighting, _check_first_token)),
)}

TEACHER_KEYS = tuple(dict.fromkeys(t.key for a in ALGORITHMS.values() for t in a.teachers))


def algorithm(name: str) -> Algorithm:
    """The entry of ``algo=<name>``; ConfigError for an unknown name."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algo={name!r} is not supported; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def sharded_algorithms() -> list[str]:
    """The algorithms strategy=fsdp can train."""
    return [a.name for a in ALGORITHMS.values() if "fsdp" in a.strategies]
