"""Frozen teachers for distillation, loaded from this project's checkpoints (flm-math §5-6).

A teacher is the backbone a checkpoint's own saved config describes, with the
checkpoint's EMA weights, frozen and in eval mode. The Lightning modules keep
teachers outside their registered children, so teachers are neither optimised
nor saved in the student's checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from checkpointing import load_checkpoint_file
from exact_denoiser import ORACLE, ExactDenoiser
from models.dit import DiT, build_backbone
from utils import ConfigError

log = logging.getLogger(__name__)

# model config keys that must agree between teacher and student
MODEL_SHAPE_KEYS = ("length", "hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio")


def _require_path(path, key: str) -> Path:
    if path is None or str(path).strip() in ("", "null", "None"):
        raise ConfigError(f"{key} is not set: pass {key}=/path/to/checkpoint.ckpt "
                          "(a checkpoint written by this project's training)")
    path = Path(str(path))
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; point it at a checkpoint "
                          "written by this project's training (e.g. .../checkpoints/last.ckpt)")
    return path


def load_teacher(path, key: str, student_model: DictConfig, vocab_size: int,
                 expected_algo: str) -> DiT:
    """The frozen EMA backbone of the checkpoint at ``path`` (config key ``key``).

    Raises ``ConfigError`` naming ``key`` when the path is unset or missing, the
    checkpoint was trained with another algorithm than ``expected_algo``, or its
    vocabulary, length or model shape differs from the student's.
    """
    file = _require_path(path, key)
    ckpt = load_checkpoint_file(file, key)
    hyper = ckpt.get("hyper_parameters") or {}
    if "config" not in hyper or "vocab_size" not in hyper or "ema" not in ckpt:
        raise ConfigError(f"{key}={file} has no saved config/vocab_size/EMA weights: "
                          "not a checkpoint written by this project's training")
    saved = OmegaConf.create(hyper["config"])
    if saved.algo.name != expected_algo:
        raise ConfigError(f"{key}={file} was trained with algo={saved.algo.name}; "
                          f"this key needs an algo={expected_algo} checkpoint")
    if int(hyper["vocab_size"]) != vocab_size:
        raise ConfigError(f"{key}={file} has a vocabulary of {hyper['vocab_size']} tokens but the "
                          f"data tokenizer has {vocab_size}: use the data=... it was trained on")
    mismatched = [f"model.{k}: teacher {saved.model[k]} vs student {student_model[k]}"
                  for k in MODEL_SHAPE_KEYS if saved.model[k] != student_model[k]]
    if mismatched:
        raise ConfigError(f"{key}={file} does not match the student's model config ("
                          + "; ".join(mismatched) + "): pass the teacher's model=... and "
                          "model.length")
    teacher = build_backbone(saved.model, vocab_size, bool(saved.algo.double_temb))
    try:
        teacher.load_state_dict(ckpt["ema"]["shadow"], strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{key}={file}: EMA weights do not fit the saved model config "
                          f"({err})") from err
    teacher.requires_grad_(False)
    teacher.eval()
    log.info("loaded frozen teacher %s=%s (algo=%s, step %s)", key, file, saved.algo.name,
             ckpt.get("global_step"))
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
    """Copy the teacher's weights into a double-time-embedding student (flm-math §5-6).

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
