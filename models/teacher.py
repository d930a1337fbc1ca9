"""Frozen teachers for distillation (docs/math.md §5-6).

A teacher is the backbone of a checkpoint (this project's, a released checkpoint of
the paper, a Hugging Face folder or Hub repo id: models/load.py) with its EMA
weights, frozen and in eval mode. The Lightning modules keep teachers outside
their registered children, so teachers are neither optimised nor saved in the
student's checkpoints.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from flow.registry import algorithm
from models.dit import DiT
from models.exact_denoiser import ORACLE, ExactDenoiser
from models.load import check_location, load_backbone
from runtime.checkpointing import compatibility
from runtime.config import ConfigError

log = logging.getLogger(__name__)


def check_teacher_locations(config: DictConfig) -> None:
    """Each teacher path of ``algo=<name>`` (flow/registry.py) is ``oracle``, unset (loading
    says so) or a location that exists: a file, a Hugging Face folder or a Hub repo id; checked
    before any work, the checkpoints themselves are read when the module is built."""
    for teacher in algorithm(config.algo.name).teachers:
        path = config.algo.get(teacher.key)
        if path is not None and path != ORACLE:
            check_location(path, f"algo.{teacher.key}")


def load_teacher(path, key: str, student_model: DictConfig, vocab_size: int,
                 expected_algo: str) -> DiT:
    """The frozen EMA backbone of the checkpoint at ``path`` (config key ``key``).

    Raises ``ConfigError`` naming ``key`` when the path is unset or not a checkpoint, the
    checkpoint was trained with another algorithm than ``expected_algo``, or its
    vocabulary, length or model shape differs from the student's.
    """
    if path is None or str(path).strip() in ("", "null", "None"):
        raise ConfigError(f"{key} is not set: pass {key}=/path/to/checkpoint.ckpt (a checkpoint "
                          "of this project's training or a released one of the paper)")
    teacher, settings = load_backbone(path, use_ema=True, length=student_model.length, what=key,
                                      algo=expected_algo)
    if settings.algo is None:
        log.warning("%s=%s does not record its algorithm: taken as algo=%s", key, path,
                    expected_algo)
    found = compatibility(settings.vocab_size, settings.model_config(), settings.algo,
                          vocab_size, student_model, expected_algo)
    if found.algo is not None:
        raise ConfigError(f"{key}={path} was trained with algo={settings.algo}; "
                          f"this key needs an algo={expected_algo} checkpoint")
    if found.vocab_size is not None:
        raise ConfigError(f"{key}={path} has a vocabulary of {settings.vocab_size} tokens but "
                          f"the data tokenizer has {vocab_size}: use the data=... it was "
                          "trained on")
    mismatched = [f"model.{k}: teacher {old} vs student {new}" for k, old, new in found.model]
    if mismatched:
        raise ConfigError(f"{key}={path} does not match the student's model config ("
                          + "; ".join(mismatched) + "): pass the teacher's model=... and "
                          "model.length")
    teacher.requires_grad_(False)
    teacher.eval()
    log.info("loaded frozen teacher %s=%s (algo=%s, step %s)", key, path, settings.algo,
             settings.global_step)
    return teacher


def oracle_teacher(data_cfg: DictConfig, key: str, vocab_size: int,
                   expected_algo: str) -> ExactDenoiser:
    """``algo.<key>=oracle``: the exact (Bayes-optimal) denoiser of ``data=synthetic*`` as a
    frozen FLM teacher, so that a distilled model measures distillation alone."""
    if expected_algo != "flm":
        raise ConfigError(f"{key}={ORACLE}: the exact denoiser stands in for an algo=flm "
                          f"teacher only; {key} needs an algo={expected_algo} checkpoint")
    if data_cfg.get("name") != "synthetic":
        raise ConfigError(f"{key}={ORACLE} needs data=synthetic (or synthetic-hmm, "
                          f"synthetic-ladder), whose source defines the exact denoiser; got "
                          f"data.name={data_cfg.get('name')!r}")
    try:
        teacher = ExactDenoiser.from_data_config(data_cfg)
    except ValueError as err:
        raise ConfigError(f"{key}={ORACLE}: {err}") from err
    if teacher.vocab_size != vocab_size:
        raise ConfigError(f"{key}={ORACLE}: the source has {teacher.vocab_size} tokens but the "
                          f"student {vocab_size}")
    teacher.requires_grad_(False)
    teacher.eval()
    log.info("frozen teacher %s=%s: the exact denoiser of the %s source", key, ORACLE,
             teacher.source_kind)
    return teacher


@torch.no_grad()
def initialise_student(student: DiT, teacher: DiT, zero_output_layer: bool) -> None:
    """Copy the teacher's weights into a double-time-embedding student (docs/math.md §5-6).

    The second time embedding keeps its fresh first layer and gets a zeroed last
    layer, so it adds nothing at start; ``zero_output_layer`` zeroes the student's
    output layer (stage 1: g = 0, the student starts as Euler). An exact-denoiser teacher
    (``oracle_teacher``) has no weights: the student keeps its fresh initialisation, whose
    output layer is zero already (models/dit.py).
    """
    if getattr(teacher, "is_oracle", False):
        log.info("teacher is the exact denoiser: the student starts from a fresh initialisation")
        return
    if student.second_time_embedding is None:
        raise ConfigError("flow-map students need algo.double_temb=true")
    state = {k: v for k, v in teacher.state_dict().items()
             if not k.startswith("second_time_embedding.")}
    missing, unexpected = student.load_state_dict(state, strict=False)
    leftover = [k for k in missing if not k.startswith("second_time_embedding.")]
    if leftover or unexpected:
        raise ConfigError(f"teacher and student backbones differ: missing {leftover[:5]}, "
                          f"unexpected {unexpected[:5]}")
    last = student.second_time_embedding.last_layer
    last.weight.zero_()
    last.bias.zero_()
    if zero_output_layer:
        for layer in (student.output_layer.modulation, student.output_layer.linear):
            layer.weight.zero_()
            layer.bias.zero_()
