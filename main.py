"""Entry point: ``python -m main mode=train|ppl_eval|sample_eval [overrides]``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment

import algo
import dataloader
import reliability
import utils
from checkpointing import (
    LAST_NAME,
    PERIODIC_PREFIX,
    AtomicCheckpointIO,
    check_compatible,
    find_resume_checkpoint,
    load_checkpoint_file,
)
from exact_denoiser import ORACLE, check_denoiser_choice, oracle_sampling_module

log = logging.getLogger("main")


def build_strategy(config: DictConfig):
    world = config.trainer.devices * config.trainer.num_nodes
    name = config.strategy.name
    if utils.fsdp_training(config):
        from pytorch_lightning.strategies import ModelParallelStrategy
        # FSDP2 over every rank (no tensor parallelism); one gathered checkpoint file, written
        # by rank 0 through the trainer's AtomicCheckpointIO like the ddp ones
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if name == "fsdp":  # evaluation: load_for_eval builds an unsharded model
        log.info("mode=%s runs unsharded (strategy=fsdp applies to training)", config.mode)
    elif name != "ddp":
        raise utils.ConfigError(f"strategy={name!r} is not supported; use strategy=ddp or fsdp")
    if world == 1:
        return "auto"
    from pytorch_lightning.strategies import DDPStrategy
    return DDPStrategy(find_unused_parameters=config.strategy.get("find_unused_parameters",
                                                                  False))


def build_callbacks(config: DictConfig) -> list[pl.Callback]:
    ckpt_dir = Path(config.checkpointing.save_dir) / "checkpoints"
    last = ckpt_dir / LAST_NAME
    cb = config.callbacks
    rc = config.reliability
    # every file goes through the trainer's AtomicCheckpointIO (build_trainer)
    callbacks: list[pl.Callback] = [
        reliability.NonFiniteGuard(rc.max_consecutive_nonfinite, last),
        reliability.PreemptionHandler(last, tuple(rc.checkpoint_signals),
                                      tuple(rc.requeue_signals)),
        reliability.RNGStates(), reliability.FinalCheckpoint(last), reliability.ResplitLoop()]
    if "checkpoint_every_n_steps" in cb:
        callbacks.append(reliability.StepCheckpoint(
            dirpath=ckpt_dir, filename=PERIODIC_PREFIX + "{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cb.checkpoint_every_n_steps.every_n_train_steps,
            save_top_k=cb.checkpoint_every_n_steps.save_top_k, save_last=False))
    if "checkpoint_last" in cb:
        callbacks.append(reliability.StepCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=cb.checkpoint_last.every_n_train_steps,
            save_top_k=0, save_last=True, enable_version_counter=False))
    if "learning_rate_monitor" in cb:
        callbacks.append(LearningRateMonitor(logging_interval=cb.learning_rate_monitor
                                             .logging_interval))
    return callbacks


def build_loggers(config: DictConfig) -> list:
    save_dir = config.checkpointing.save_dir
    loggers: list = [CSVLogger(save_dir, name="csv")]
    mode = config.wandb.mode
    if mode not in ("online", "offline", "disabled"):
        raise utils.ConfigError(f"wandb.mode={mode!r}; expected online, offline or disabled")
    if mode != "disabled":
        loggers.append(WandbLogger(project=config.wandb.project, name=config.wandb.name,
                                   group=config.wandb.group, tags=list(config.wandb.tags),
                                   id=config.wandb.id, save_dir=save_dir, offline=mode == "offline",
                                   config=OmegaConf.to_container(config, resolve=True)))
    return loggers


def build_trainer(config: DictConfig, **overrides) -> pl.Trainer:
    tc = config.trainer
    val_interval = tc.val_check_interval
    plugins: list = [AtomicCheckpointIO()]  # periodic, last and preemption checkpoints alike
    if SLURMEnvironment.detect():
        # reliability.PreemptionHandler saves and requeues; Lightning's own SLURM handler would
        # write a second (hpc_ckpt_*) checkpoint that resume does not read
        plugins.append(SLURMEnvironment(auto_requeue=False))
    kwargs = dict(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        precision=tc.precision, max_steps=tc.max_steps, gradient_clip_val=tc.gradient_clip_val,
        accumulate_grad_batches=tc.accumulate_grad_batches, val_check_interval=val_interval,
        # an integer interval counts optimizer steps across epochs
        check_val_every_n_epoch=None if isinstance(val_interval, int) else 1,
        limit_val_batches=tc.limit_val_batches, log_every_n_steps=tc.log_every_n_steps,
        num_sanity_val_steps=tc.num_sanity_val_steps,
        enable_progress_bar=tc.enable_progress_bar, strategy=build_strategy(config),
        plugins=plugins, use_distributed_sampler=False,
        default_root_dir=config.checkpointing.save_dir)
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def build_module(config: DictConfig, tokenizer) -> algo.FlowLM:
    cls = algo.algorithm_class(config.algo.name)
    return cls(config, vocab_size=len(tokenizer), tokenizer=tokenizer)


def log_samples(module: algo.FlowLM, config: DictConfig) -> list[str]:
    """Generate with the EMA weights and write a handful of samples to the log."""
    sc = config.sampling
    generator = torch.Generator(device=module.device).manual_seed(config.seed)
    dtype = algo.STATE_DTYPES[sc.state_dtype]
    with module.ema.swapped_in(module.backbone):
        module.eval()
        tokens = module.generate(sc.print_samples, int(sc.steps[0]), generator, dtype)
    texts = module.tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)
    for i, text in enumerate(texts):
        log.info("sample %d (%d steps): %s", i, int(sc.steps[0]), text)
    return texts


def train(config: DictConfig) -> None:
    tokenizer = dataloader.get_tokenizer(config)
    ckpt_path = None
    if config.checkpointing.resume_from_ckpt:
        found, ckpt = find_resume_checkpoint(config.checkpointing.resume_ckpt_path,
                                             config.checkpointing.fallback_to_previous)
        if found is not None:
            check_compatible(ckpt, config, len(tokenizer), found)
            del ckpt
            ckpt_path = str(found)
            log.info("resuming from %s", found)
    datamodule = dataloader.FLMDataModule(config, tokenizer)
    module = build_module(config, tokenizer)
    callbacks = build_callbacks(config)
    trainer = build_trainer(config, callbacks=callbacks, logger=build_loggers(config))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    preemption = next(c for c in callbacks if isinstance(c, reliability.PreemptionHandler))
    if preemption.stopped_by is not None:
        log.info("stopped by %s at step %d; %s holds the resume point", preemption.stopped_by,
                 trainer.global_step, preemption.checkpoint_path)
        return
    final = next(c for c in callbacks if isinstance(c, reliability.FinalCheckpoint))
    last = final.checkpoint_path
    if final.saved_step is None:  # ended before max_steps without a signal (e.g. max_steps=-1)
        trainer.save_checkpoint(last)
    if config.sampling.print_samples > 0 and module.sharded:
        log.info("strategy=fsdp: the weights are sharded, no samples printed; run "
                 "mode=sample_eval eval.checkpoint_path=%s", last)
    elif trainer.is_global_zero and config.sampling.print_samples > 0:
        log_samples(module, config)


def load_for_eval(config: DictConfig) -> tuple[algo.FlowLM, object]:
    """Module from ``eval.checkpoint_path`` with the EMA weights in the backbone.

    Model and algorithm come from the checkpoint; data, sampling and eval
    settings from the current config.
    """
    if not config.eval.checkpoint_path:
        raise utils.ConfigError("set eval.checkpoint_path=<checkpoint> (or CKPT_PATH in scripts)")
    ckpt = load_checkpoint_file(config.eval.checkpoint_path, "eval.checkpoint_path")
    saved = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    merged = config.copy()
    with open_dict(merged):  # replace whole nodes: the saved algo may have keys the default lacks
        merged.model, merged.algo = saved.model, saved.algo
    # Teachers may have moved since training: paths given now win over the saved ones.
    for key in utils.TEACHER_KEYS:
        if config.algo.get(key) and key in merged.algo:
            merged.algo[key] = config.algo[key]
    if config.model.length != saved.model.length:
        log.info("model.length=%s comes from the checkpoint (the config had %s)",
                 saved.model.length, config.model.length)
    tokenizer = dataloader.get_tokenizer(merged)
    if len(tokenizer) != ckpt["hyper_parameters"]["vocab_size"]:
        raise utils.ConfigError(
            f"the data tokenizer has {len(tokenizer)} tokens but the checkpoint's model has "
            f"{ckpt['hyper_parameters']['vocab_size']}: pass the data=... it was trained on")
    module = build_module(merged, tokenizer)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    if not config.eval.disable_ema:
        module.ema.copy_to(module.backbone)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return module.to(device).eval(), tokenizer


def ppl_eval(config: DictConfig) -> None:
    module, tokenizer = load_for_eval(config)
    # EMA weights are already in the backbone: validation must not swap them again.
    module.config = OmegaConf.merge(module.config, {"eval": {"disable_ema": True}})
    datamodule = dataloader.FLMDataModule(module.config, tokenizer)
    trainer = build_trainer(config, logger=False, limit_val_batches=config.trainer
                            .limit_val_batches)
    results = trainer.validate(module, datamodule=datamodule)
    log.info("ppl_eval: %s", results)


def sample_eval(config: DictConfig) -> None:
    from evaluation.sample_eval import run_from_config
    check_denoiser_choice(config)
    if config.eval.denoiser == ORACLE:  # the exact denoiser of data=synthetic, no checkpoint
        module, tokenizer = oracle_sampling_module(config)
    else:
        module, tokenizer = load_for_eval(config)
    run_from_config(module.config, module, tokenizer)  # model settings from the checkpoint


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(config: DictConfig) -> None:
    config = utils.resolve_config(config)
    torch.set_float32_matmul_precision("high")
    pl.seed_everything(config.seed, workers=True)
    if config.mode == "train":
        path = utils.save_config(config, config.checkpointing.save_dir)
        log.info("resolved config written to %s", path)
    log.info("mode=%s algo=%s model=%s data=%s devices=%s nodes=%s global_batch=%s "
             "batch=%s accumulate=%s", config.mode, config.algo.name, config.model.name,
             config.data.name, config.trainer.devices, config.trainer.num_nodes,
             config.loader.global_batch_size, config.loader.batch_size,
             config.trainer.accumulate_grad_batches)
    {"train": train, "ppl_eval": ppl_eval, "sample_eval": sample_eval}[config.mode](config)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
