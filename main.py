"""Entry point: ``python -m main mode=train|ppl_eval|sample_eval|generate [overrides]``."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from pytorch_lightning.utilities.warnings import PossibleUserWarning

import algo
import data
from algo.oracle import oracle_sampling_module
from evaluation import checkpoint_config, diagnostics, ppl, protocol
from evaluation.sample_eval import check_temperatures, run_from_config
from flow.registry import TEACHER_KEYS
from models.ema import EMA
from models.exact_denoiser import ORACLE
from models.generate import (
    check_output_path,
    infill_template,
    parse_infill,
    prompt_known,
)
from models.load import backbone_from_source, config_nodes, read_source
from runtime import cli, reliability
from runtime.checkpointing import (
    LAST_NAME,
    PERIODIC_PREFIX,
    RUN_ID_KEY,
    AtomicCheckpointIO,
    FinalCheckpoint,
    ReserveHostBuffers,
    ResumeOverrides,
    RunIdentity,
    StepCheckpoint,
    check_compatible,
    check_resume_config,
    compatibility,
    find_resume_checkpoint,
    new_run_id,
    record_launch,
    remove_stale_temporaries,
    write_run_id,
)
from runtime.config import STATE_DTYPES, ConfigError, fsdp_training, save_config
from runtime.monitoring import (
    LoggedLater,
    Throughput,
    TrainingReport,
    process_start_time,
    progress_bar,
)
from speed.compile import compile_for_sampling, use_cache_dir

log = logging.getLogger("main")
checkpoint_config.register_resolvers()  # hydra.run.dir names the checkpoint's data and algorithm


def build_strategy(config: DictConfig):
    world = config.trainer.devices * config.trainer.num_nodes
    name = config.strategy.name
    if fsdp_training(config):
        # FSDP2 over every rank (no tensor parallelism); one gathered checkpoint file, written
        # by rank 0 through the trainer's AtomicCheckpointIO like the ddp ones
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if name == "fsdp":  # evaluation: load_for_eval builds an unsharded model
        log.info("mode=%s runs unsharded (strategy=fsdp applies to training)", config.mode)
    if world == 1:
        return "auto"
    return DDPStrategy(find_unused_parameters=config.strategy.get("find_unused_parameters",
                                                                  False))


CURVES_NAME = "curves.png"  # <save_dir>/curves.png: training and validation loss


def build_callbacks(config: DictConfig) -> list[pl.Callback]:
    ckpt_dir = Path(config.checkpointing.save_dir) / "checkpoints"
    last = ckpt_dir / LAST_NAME
    cb = config.callbacks
    rc = config.reliability
    # every file goes through the trainer's AtomicCheckpointIO (build_trainer)
    callbacks: list[pl.Callback] = [
        ReserveHostBuffers(),  # the background writer's pinned buffers, before any save
        reliability.NonFiniteGuard(rc.max_consecutive_nonfinite, last),
        # Ctrl-C too: a checkpoint at the next step boundary, exit 130
        reliability.PreemptionHandler(last, (*rc.checkpoint_signals, "SIGINT"),
                                      tuple(rc.requeue_signals)),
        reliability.RNGStates(), FinalCheckpoint(last), reliability.ResplitLoop(),
        Throughput(int(config.loader.global_batch_size) * int(config.model.length)),
        # written to the loggers without a device sync (train/grad_norm: when clipping is on)
        LoggedLater(("train/loss", "train/grad_norm"))]
    if "checkpoint_every_n_steps" in cb:
        callbacks.append(StepCheckpoint(
            dirpath=ckpt_dir, filename=PERIODIC_PREFIX + "{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=cb.checkpoint_every_n_steps.every_n_train_steps,
            save_top_k=cb.checkpoint_every_n_steps.save_top_k, save_last=False))
    if "checkpoint_last" in cb:
        callbacks.append(StepCheckpoint(
            dirpath=ckpt_dir, every_n_train_steps=cb.checkpoint_last.every_n_train_steps,
            save_top_k=0, save_last=True, enable_version_counter=False))
    # a log line every log_every_n_steps steps and the loss curves (curves.png)
    callbacks.append(TrainingReport(
        int(config.trainer.log_every_n_steps),
        int(config.loader.global_batch_size) * int(config.model.length),
        Path(config.checkpointing.save_dir) / CURVES_NAME,
        title=f"{config.data.name}-{config.algo.name}", started=process_start_time()))
    if config.trainer.enable_progress_bar:  # shows train/loss without a device sync per step
        callbacks.append(progress_bar(int(config.trainer.log_every_n_steps)))
    if "learning_rate_monitor" in cb:
        callbacks.append(LearningRateMonitor(logging_interval=cb.learning_rate_monitor
                                             .logging_interval))
    return callbacks


def build_loggers(config: DictConfig) -> list:
    save_dir = config.checkpointing.save_dir
    loggers: list = [CSVLogger(save_dir, name="csv")]
    mode = config.wandb.mode
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={mode!r}; expected online, offline or disabled")
    if mode != "disabled":
        loggers.append(WandbLogger(project=config.wandb.project, name=config.wandb.name,
                                   group=config.wandb.group, tags=list(config.wandb.tags),
                                   id=config.wandb.id, save_dir=save_dir, offline=mode == "offline",
                                   config=OmegaConf.to_container(config, resolve=True)))
    return loggers


def build_trainer(config: DictConfig, **overrides) -> pl.Trainer:
    tc = config.trainer
    val_interval = tc.val_check_interval
    # periodic, last and preemption checkpoints alike, written from a background thread
    plugins: list = [AtomicCheckpointIO(background=config.checkpointing.background_writes)]
    if SLURMEnvironment.detect():
        # reliability.PreemptionHandler saves and requeues; Lightning's own SLURM handler would
        # write a second (hpc_ckpt_*) checkpoint that resume does not read
        plugins.append(SLURMEnvironment(auto_requeue=False))
    kwargs = dict(
        profiler=tc.get("profiler"), accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
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


RUN_ID_ENV = "FLM_RUN_ID"  # hands rank 0's run id to the DDP processes Lightning launches


def is_launch_rank_zero() -> bool:
    """True in the process that owns the run directory: global rank 0 of the launch (before
    Lightning sets up distributed training, ranks are read from the launcher's variables)."""
    return all(os.environ.get(var, "0") == "0"
               for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def train(config: DictConfig, record: dict[str, str] | None = None) -> None:
    """Train, resuming from ``checkpointing.resume_ckpt_path`` when it exists.

    Exits with reliability.EXIT_PREEMPTED (75) after a checkpoint signal and 130 after Ctrl-C,
    once the resume checkpoint is on disk; during start-up, before the first step, at once
    (nothing to save). A run refused by the directory's lock writes nothing there: the
    ``record`` (``hydra_record``) and the first log line come once the lock is held.
    """
    save_dir = Path(config.checkpointing.save_dir)
    rank_zero = is_launch_rank_zero()
    rc = config.reliability
    lock = reliability.RunLock(save_dir)
    try:
        with reliability.stop_at_startup((*rc.checkpoint_signals, "SIGINT"),
                                         tuple(rc.requeue_signals)):
            if rank_zero:  # the other ranks run inside rank 0's launch
                lock.acquire()
            try:
                accepted(config, record if rank_zero else None)
                _train(config, save_dir, rank_zero)
            finally:
                lock.release()
    except reliability.StoppedAtStartup as stop:
        if stop.requeue and rank_zero:
            reliability.requeue_slurm_job()
        log.warning("%s; exiting with status %d", stop, stop.exit_code)
        raise SystemExit(stop.exit_code) from None


def _train(config: DictConfig, save_dir: Path, rank_zero: bool) -> None:
    ckpt_dir = save_dir / "checkpoints"
    cc = config.checkpointing
    if rank_zero:
        for directory in {ckpt_dir, Path(cc.resume_ckpt_path).parent}:
            remove_stale_temporaries(directory)
    tokenizer = data.get_tokenizer(config)
    ckpt_path, changes, step = None, {}, 0
    # rank 0 decides; the ranks Lightning launches take its id from the environment
    run_id = None if rank_zero else os.environ.get(RUN_ID_ENV)
    if cc.resume_from_ckpt:
        found, ckpt = find_resume_checkpoint(cc.resume_ckpt_path, cc.fallback_to_previous)
        if found is not None:
            check_compatible(ckpt, config, len(tokenizer), found)
            changes = check_resume_config(ckpt, config, found)
            run_id = run_id or ckpt.get(RUN_ID_KEY)
            step = int(ckpt.get("global_step", 0))
            if run_id is None:
                log.info("%s has no run id (older checkpoint): the run gets one now", found)
            del ckpt
            ckpt_path = str(found)
            log.info("resuming from %s (step %d)", found, step)
    run_id = run_id or new_run_id()
    os.environ[RUN_ID_ENV] = run_id
    if rank_zero:  # the run is accepted: record it
        write_run_id(ckpt_dir, run_id)
        log.info("resolved config written to %s", save_config(config, save_dir))
        record_launch(save_dir, run_id, step, changes)
    datamodule = data.FLMDataModule(config, tokenizer)
    module = build_module(config, tokenizer)
    callbacks = build_callbacks(config)
    callbacks += [RunIdentity(run_id), ResumeOverrides(config, list(changes))]
    trainer = build_trainer(config, callbacks=callbacks, logger=build_loggers(config))
    io = trainer.strategy.checkpoint_io
    # Lightning recognises only a Stateful DataLoader as resumable and warns otherwise; the
    # data position is restored here by FLMDataModule.state_dict (ResumableDistributedSampler),
    # so that one warning is false and is silenced (exactly that message).
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended "
                            r"before the epoch ended and your dataloader is not resumable",
                            category=PossibleUserWarning)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except reliability.Preempted as stop:
        io.wait()  # the resume checkpoint is on disk before the process ends
        log.warning("%s; exiting with status %d", stop, stop.exit_code)
        raise SystemExit(stop.exit_code) from None
    final = next(c for c in callbacks if isinstance(c, FinalCheckpoint))
    last = final.checkpoint_path
    if final.saved_step is None:  # ended before max_steps without a signal (max_epochs)
        trainer.save_checkpoint(last)
    io.wait()
    if trainer.is_global_zero:
        log.info("train outputs in %s: checkpoints/%s, %s, csv/ (metrics.csv), "
                 "config_resolved.yaml", save_dir, Path(last).name, CURVES_NAME)
    if config.sampling.print_samples > 0 and module.sharded:
        log.info("strategy=fsdp: the weights are sharded, no samples printed; run "
                 "mode=sample_eval eval.checkpoint_path=%s", last)
    elif trainer.is_global_zero and config.sampling.print_samples > 0:
        module.log_samples("after training")


def load_for_eval(config: DictConfig) -> tuple[algo.FlowLM, object]:
    """Module from ``eval.checkpoint_path`` with the EMA weights in the backbone.

    The path may be this project's checkpoint, a released checkpoint of the paper, a
    Hugging Face folder or a Hub repo id (models/load.py). Model and algorithm come from
    the checkpoint; data, sampling and eval settings from the current config.
    """
    key = "eval.checkpoint_path"
    if not config.eval.checkpoint_path:
        raise ConfigError(f"set {key}=<checkpoint> (or CKPT_PATH in scripts)")
    path = config.eval.checkpoint_path
    source = read_source(path, key)
    backbone, settings = backbone_from_source(source, use_ema=not config.eval.disable_ema,
                                              length=config.model.length, what=key)
    saved_model, saved_algo = config_nodes(path, settings, config, key)
    merged = config.copy()
    with open_dict(merged):  # replace whole nodes: the saved algo may have keys the default lacks
        merged.model, merged.algo = saved_model, saved_algo
    # Teachers may have moved since training: paths given now win over the saved ones.
    for teacher_key in TEACHER_KEYS:
        if config.algo.get(teacher_key) and teacher_key in merged.algo:
            merged.algo[teacher_key] = config.algo[teacher_key]
    if config.model.length != merged.model.length:
        log.info("model.length=%s comes from the checkpoint (the config had %s)",
                 merged.model.length, config.model.length)
    tokenizer = data.get_tokenizer(merged)
    # the model and algo are the checkpoint's own (merged above): only the vocabulary is compared
    if compatibility(settings.vocab_size, None, None, len(tokenizer)).vocab_size is not None:
        raise ConfigError(
            f"the data tokenizer has {len(tokenizer)} tokens but the checkpoint's model has "
            f"{settings.vocab_size}: pass the data=... it was trained on")
    module = build_module(merged, tokenizer)
    if settings.source == "project":  # the whole module: loss weighting and EMA too
        ckpt = source.checkpoint
        module.load_state_dict(ckpt["state_dict"])
        module.on_load_checkpoint(ckpt)
        if not config.eval.disable_ema:
            module.ema.copy_to(module.backbone)
    else:  # the paper's: the backbone only, its EMA (or live) weights already chosen
        module.backbone.load_state_dict(backbone.state_dict())
        module.ema = EMA(module.backbone, merged.training.ema)
    module.checkpoint_step = settings.global_step  # reported by ppl_eval (None: not recorded)
    if config.sampling.compile:  # the samplers call features() / head(), not forward()
        compiled = sum(compile_for_sampling(net) for net in module.sampling_networks())
        log.info("sampling.compile=true: %d network(s) compiled for sampling", compiled)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return module.to(device).eval(), tokenizer


PPL_NAME = "ppl.json"  # <eval.output_dir>/ppl.json: mode=ppl_eval's report


def ppl_eval(config: DictConfig) -> None:
    module, tokenizer = load_for_eval(config)
    # EMA weights are already in the backbone: validation must not swap them again.
    module.config = OmegaConf.merge(module.config, {"eval": {"disable_ema": True}})
    datamodule = data.FLMDataModule(module.config, tokenizer)
    trainer = build_trainer(config, logger=False, limit_val_batches=config.trainer
                            .limit_val_batches)
    results = trainer.validate(module, datamodule=datamodule)
    if not trainer.is_global_zero:
        return
    world = int(config.trainer.devices) * int(config.trainer.num_nodes)
    report = ppl.ppl_report(
        float(results[0]["val/loss"]), algo=module.config.algo.name,
        step=module.checkpoint_step,
        checkpoint_path=str(config.eval.checkpoint_path), data_name=module.config.data.name,
        split=str(module.config.data.valid), batches_scored=int(trainer.num_val_batches[0]),
        batches_total=len(datamodule.val_dataloader()),
        sequences_per_batch=int(config.loader.eval_batch_size) * world,
        length=int(module.config.model.length))
    log.info("%s", ppl.describe(report))
    log.info("ppl_eval output: %s", ppl.write_report(report, Path(config.eval.output_dir)
                                                     / PPL_NAME))


def sample_eval(config: DictConfig) -> None:
    protocol.validate(config)  # eval.protocol / sampling.autocast, before loading anything
    diagnostics.check_config(config)  # eval.denoiser (network | oracle | hybrid), eval.diagnose
    check_temperatures(config.eval.temperatures)
    if config.eval.denoiser == ORACLE:  # the exact denoiser of data=synthetic, no checkpoint
        module, tokenizer = oracle_sampling_module(config)
    else:
        module, tokenizer = load_for_eval(config)
    run_from_config(module.config, module, tokenizer)  # model settings from the checkpoint


GENERATE_FORMATS = ("text", "json")  # generate.format: what mode=generate prints to stdout
SAMPLE_RULE = "====="  # frames the header line printed before each sample


def generate_text(config: DictConfig) -> None:
    """mode=generate: prompt continuation or infilling from ``eval.checkpoint_path``
    (docs/math.md §9); prints the texts and writes them with the settings to
    ``generate.output_path``."""
    gc, sc = config.generate, config.sampling
    if gc.format not in GENERATE_FORMATS:
        raise ConfigError(f"generate.format={gc.format!r}; expected one of "
                                f"{list(GENERATE_FORMATS)}")
    given = [k for k in ("prompt", "prompt_file", "infill") if gc[k] is not None]
    if len(given) > 1:
        raise ConfigError(f"generate.{' and generate.'.join(given)} are all set: give one "
                                "of generate.prompt, generate.prompt_file, generate.infill")
    if int(gc.num_samples) < 1:
        raise ConfigError(f"generate.num_samples={gc.num_samples}; must be >= 1")
    if gc.prompt_file is not None:
        file = Path(str(gc.prompt_file))
        if not file.is_file():
            raise ConfigError(f"generate.prompt_file={file}: no such file")
        prompts = file.read_text().splitlines()
        empty = [i + 1 for i, line in enumerate(prompts) if not line.strip()]
        if not prompts or empty:
            raise ConfigError(f"generate.prompt_file={file} has empty lines {empty} (or "
                                    "none at all): one prompt per line")
    elif gc.prompt is not None:
        prompts = [str(gc.prompt)]
    else:
        prompts = []
    pieces = parse_infill(gc.infill) if gc.infill is not None else None  # before loading
    out = check_output_path(gc.output_path)
    module, tokenizer = load_for_eval(config)
    length = int(module.config.model.length)
    if pieces is not None:  # the sample ends where the template ends
        conditions = [(str(gc.infill), *infill_template(tokenizer, pieces, length, gc.add_bos))]
    else:
        conditions = [(text, *prompt_known(tokenizer, text, length, gc.add_bos), length)
                      for text in prompts] or [(None, None, None, length)]
    seed = cli.fresh_seed() if gc.seed is None else int(gc.seed)
    log.info("generate.seed=%d%s", seed, f" (drawn for this run; generate.seed={seed} "
             "repeats it)" if gc.seed is None else "")
    generator = torch.Generator(device=module.device).manual_seed(seed)
    dtype = STATE_DTYPES[sc.state_dtype]
    records = []
    for steps in (int(s) for s in sc.steps):
        for index, (text, known, mask, end) in enumerate(conditions):
            for start in range(0, int(gc.num_samples), int(sc.batch_size)):
                count = min(int(sc.batch_size), int(gc.num_samples) - start)
                tokens = module.generate(count, steps, generator, dtype, prompt_ids=known,
                                         known_mask=None if known is None else mask).cpu()
                for row in tokens[:, :end]:
                    sample = tokenizer.decode(row, skip_special_tokens=True)
                    records.append({"steps": steps, "condition": index, "condition_text": text,
                                    "text": sample, "token_ids": row.tolist(),
                                    "known_mask": None if mask is None else
                                    mask[:end].tolist()})
                    if gc.format == "text":  # a header line before each (multi-line) sample
                        print(f"{SAMPLE_RULE} sample {len(records)} · {steps} steps · "
                              f"condition {index} {SAMPLE_RULE}\n{sample}\n", flush=True)
    settings = {"checkpoint_path": str(config.eval.checkpoint_path),
                "algo": module.config.algo.name, "model_length": length,
                "steps": [int(s) for s in sc.steps], "num_samples": int(gc.num_samples),
                "seed": seed, "state_dtype": sc.state_dtype,
                "denominator_eps": float(sc.denominator_eps), "add_bos": gc.add_bos,
                "prompt": gc.prompt, "prompt_file": gc.prompt_file, "infill": gc.infill,
                "ema": not config.eval.disable_ema}
    result = {"settings": settings, "samples": records}
    out.write_text(json.dumps(result, indent=1))
    if gc.format == "json":  # stdout holds the JSON alone (the log goes to stderr)
        print(json.dumps(result), flush=True)
    log.info("generate output: %d samples written to %s", len(records), out)


def hydra_record(config: DictConfig) -> dict[str, str] | None:
    """The files Hydra writes to ``<run dir>/.hydra`` (config, hydra settings, overrides) as
    texts, taken before the config is resolved; None outside a Hydra run. The config sets
    ``hydra.output_subdir: null`` so that they are written by :func:`accepted` instead."""
    if not HydraConfig.initialized():
        return None
    hydra_config = HydraConfig.get()
    return {"config.yaml": OmegaConf.to_yaml(config),
            "hydra.yaml": OmegaConf.to_yaml({"hydra": hydra_config}),
            "overrides.yaml": OmegaConf.to_yaml(hydra_config.overrides.task),
            "directory": str(Path(hydra_config.runtime.output_dir) / ".hydra")}


def accepted(config: DictConfig, record: dict[str, str] | None) -> None:
    """The run goes ahead: write Hydra's ``record`` of it and log its settings."""
    if record is not None:
        directory = Path(record["directory"])
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (directory / name).write_text(record[name])
    log.info("mode=%s algo=%s model=%s data=%s devices=%s nodes=%s global_batch=%s "
             "batch=%s accumulate=%s", config.mode, config.algo.name, config.model.name,
             config.data.name, config.trainer.devices, config.trainer.num_nodes,
             config.loader.global_batch_size, config.loader.batch_size,
             config.trainer.accumulate_grad_batches)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(config: DictConfig) -> None:
    with cli.user_errors():  # a user's mistake: one line, exit 2
        run(config, list(HydraConfig.get().overrides.task))


def run(config: DictConfig, command_line: list[str]) -> None:
    """Run ``config.mode``; ``command_line``: the overrides given (checked against the
    checkpoint's config in the evaluation modes, checkpoint_config.py)."""
    cli.quiet_third_party()
    record = hydra_record(config)
    config = checkpoint_config.adopt_checkpoint_config(config, command_line)
    config = algo.resolve_config(config)
    torch.set_float32_matmul_precision("high")
    if config.training.compile_cache is not None:  # before anything is compiled
        try:
            cache = use_cache_dir(config.training.compile_cache)
        except OSError as error:
            raise ConfigError(f"training.compile_cache={config.training.compile_cache}: "
                              f"not a directory this process can make or use ({error})") from None
        log.info("compile caches in %s (training.compile_cache)", cache)
    pl.seed_everything(config.seed, workers=True)
    if config.mode == "train":  # accepted once the run lock is held
        train(config, record)
        return
    accepted(config, record)
    {"ppl_eval": ppl_eval, "sample_eval": sample_eval,
     "generate": generate_text}[config.mode](config)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.check_overrides(sys.argv[1:])
    main()
