"""Lightning modules: glue between data, objective, optimiser, EMA and logging.

The math lives in ``flow/`` (time table, corruption, losses, samplers), what each algorithm is
in ``flow/registry.py`` (its network, loss, sampler, strategies, teachers, settings) and the
networks in ``models/``; this file wires them per algorithm.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from data.sampler import global_batch_slot
from flow import masked
from flow.autoregressive import shift_for_next_token
from flow.flow_map import (
    Interval,
    interval_endpoints,
)
from flow.losses import masked_token_mean, weighted_loss
from flow.path import (
    distillation_noise,
    input_noise,
    noisy_input,
    stratified_times,
    uniform_times,
)
from flow.registry import Algorithm, Teacher, algorithm
from flow.schedule import AlphaGammaTable
from models.dit import build_backbone
from models.ema import EMA
from models.exact_denoiser import ORACLE, gap_denoiser, gap_metrics
from models.generate import generate
from models.loss_weight import LossWeighting
from models.parallelize import compile_requested, shard_fsdp
from models.teacher import initialise_student, load_teacher, oracle_teacher
from runtime.config import STATE_DTYPES, ConfigError, fsdp_training
from runtime.optim import StepHealth, build_adamw, clip_by_global_norm
from speed import SpeedOptions
from speed.compile import compile_loss, compile_network

log = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003  # mixes (seed, step, slot) into one generator seed


def draw_seed(seed: int, step: int, slot: int, stream: int) -> int:
    """A deterministic generator seed per (run seed, optimizer step, batch slot, stream).

    Noise and time draws are keyed by where a micro-batch sits in the global
    batch, not by which process drew it: the same global batch gets the same
    draws on 1 GPU with accumulation as on N GPUs, and after a resume.
    """
    return ((((seed * _SEED_STRIDE) + step) * _SEED_STRIDE + slot) * 4 + stream) % (2**63 - 1)


class FlowLM(pl.LightningModule):
    """Shared machinery: backbone, EMA, time table, optimiser, validation, sampling.

    ``spec`` (set by each subclass) is the algorithm's entry of flow/registry.py; the
    settings it reads are checked there, here before any work."""

    spec: Algorithm

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        self.spec.check(config)
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.save_hyperparameters({"config": OmegaConf.to_container(config, resolve=True),
                                   "vocab_size": vocab_size})
        self.speed = SpeedOptions.from_settings(compile_requested(config), config.training.fused_ce)
        self.backbone = self.build_network(config, vocab_size)
        self.table = AlphaGammaTable(vocab_size)
        self.loss_weighting = (LossWeighting(config.training.loss_weight_width,
                                             num_times=self.loss_weight_times)
                               if config.algo.learnable_loss_weighting
                               and self.loss_weight_times else None)
        self.ema = EMA(self.backbone, config.training.ema, self.speed)
        self.step_health = StepHealth()  # this optimizer step's verdict (runtime/optim.py)
        self._teachers: dict[str, torch.nn.Module] = {}  # frozen, outside the registered children
        self.sharded = fsdp_training(config)  # configure_model shards under the trainer
        if compile_requested(config) and not self.sharded:
            compile_network(self.backbone)  # under FSDP, configure_model compiles block by block
        self._noise_generator: torch.Generator | None = None

    def build_network(self, config: DictConfig, vocab_size: int) -> torch.nn.Module:
        """The trained backbone: one or two time embeddings and causal or full attention as
        the registry says, over the vocabulary plus ``extra_inputs`` input entries."""
        return build_backbone(config.model, vocab_size + self.extra_inputs(config),
                              self.spec.two_times, causal=self.spec.causal, speed=self.speed)

    def extra_inputs(self, config: DictConfig) -> int:
        """Input entries beyond the vocabulary (the baselines' mask or start entry)."""
        return 0

    @property
    def network_calls_per_step(self) -> int:
        """Network calls per sampler step (sample_eval's NFE column)."""
        return self.spec.network_calls_per_step

    @property
    def sampler_two_times(self) -> bool:
        """Whether the sampled network takes (t_i, t_{i+1}) (FMLM)."""
        return self.spec.sampler_two_times

    def teacher(self, name: str) -> torch.nn.Module:
        """The frozen teacher ``name`` (flow/registry.py's ``Teacher.name``), on this device."""
        net = self._teachers[name]
        if net.input_embedding.device != self.device:
            net.to(self.device)
        return net

    def sampling_networks(self) -> list[torch.nn.Module]:
        """The networks ``generate`` runs (compiled for sampling by main.load_for_eval)."""
        teacher = self.spec.sampling_teacher
        return [self.teacher(teacher), self.backbone] if teacher else [self.backbone]

    def configure_model(self) -> None:
        """strategy=fsdp (FSDP2): shard each DiT block, then the rest of the backbone (embedding,
        time MLPs, output layer) and the loss weighting, over all ranks; the EMA is sharded
        alike. Weights read outside a forward would be shards: the FLM input is therefore built
        inside the backbone's forward (models/dit.py)."""
        if not self.sharded:
            return
        extra = [self.loss_weighting] if self.loss_weighting is not None else []
        shard_fsdp(self.backbone, extra, self.ema, self.device_mesh["data_parallel"],
                   bool(self.config.strategy.reshard_after_forward),
                   compile_blocks=compile_requested(self.config))

    loss_weight_times = 1  # times the learnable loss weighting reads (0: none applied)

    # ---- randomness keyed by position in the global batch ---------------------
    def _slot(self, batch_idx: int) -> tuple[int, int]:
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        world = self.trainer.world_size if self._trainer else 1
        rank = self.trainer.global_rank if self._trainer else 0
        return global_batch_slot(batch_idx, accumulate, world, rank)

    def noise_generator(self, step: int, slot: int, stream: int = 0) -> torch.Generator:
        if self._noise_generator is None or self._noise_generator.device != self.device:
            self._noise_generator = torch.Generator(device=self.device)
        self._noise_generator.manual_seed(draw_seed(self.config.seed, step, slot, stream))
        return self._noise_generator

    def draw_times(self, n: int, step: int, batch_idx: int) -> torch.Tensor:
        tc = self.config.training
        slot, num_slots = self._slot(batch_idx)
        if tc.antithetic_sampling:
            offset_gen = torch.Generator().manual_seed(draw_seed(self.config.seed, step, 0, 1))
            offset = torch.rand(1, generator=offset_gen, dtype=torch.float64)  # on the host
            return stratified_times(n, slot, num_slots, offset, tc.t_min, tc.t_max, self.device)
        return uniform_times(n, tc.t_min, tc.t_max, self.noise_generator(step, slot, 2),
                             self.device)

    # ---- training / validation ------------------------------------------------
    def compute_loss(self, batch: dict, step: int, batch_idx: int) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch, self.global_step, batch_idx)
        # neither prog_bar nor logger: Lightning reads prog_bar values on the host at every
        # batch end and logger values every log_every_n_steps steps (each read waits for the
        # device); monitoring.progress_bar shows it and monitoring.LoggedLater writes it to
        # the loggers from copies that land without waiting
        self.log("train/loss", loss, sync_dist=False, logger=False)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step (backward, reliability.NonFiniteGuard filling ``step_health``,
        clipping, the optimizer), then the EMA; a skipped (non-finite) step leaves the EMA as
        it was. The next step starts from a fresh ``step_health``."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.backbone, skip=self.step_health.skipped)
        self.step_health = StepHealth()

    def on_fit_start(self) -> None:
        self.ema.to(self.device)

    def on_train_start(self) -> None:
        sc = self.config.sampling
        if (sc.print_samples_at_start and sc.print_samples > 0 and self.global_step == 0
                and self.trainer.is_global_zero and not self.sharded):
            self.log_samples("before training")

    val_loss_is_cross_entropy = False  # val/loss in nats/token, comparable with log V

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        # training's validations only: ppl_eval reports its own (evaluation/ppl.py)
        if (self.val_loss_is_cross_entropy and loss is not None and self.trainer.is_global_zero
                and not self.trainer.sanity_checking and self.trainer.state.fn == "fit"):
            log.info("step %d: val/loss %.4f nats/token (uniform baseline log V = %.4f)",
                     self.global_step, float(loss), math.log(self.vocab_size))

    def on_validation_start(self) -> None:
        self.ema.to(self.device)
        self._ema_ctx = None
        if not self.config.eval.disable_ema:
            self._ema_ctx = self.ema.swapped_in(self.backbone)
            self._ema_ctx.__enter__()

    def on_validation_end(self) -> None:
        if self._ema_ctx is not None:
            self._ema_ctx.__exit__(None, None, None)
            self._ema_ctx = None

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # A fixed stream keyed by batch index: validation loss is comparable across runs.
        loss = self.compute_loss(batch, step=-1 - batch_idx, batch_idx=0)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    # ---- optimiser --------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = build_adamw([p for p in self.parameters() if p.requires_grad],
                                self.config.optim, self.device)
        sc = self.config.lr_scheduler
        if sc.name != "constant_warmup":
            raise ValueError(f"lr_scheduler.name={sc.name!r} is not supported "
                             "(configs/lr_scheduler/ has constant_warmup)")
        warmup = max(int(sc.num_warmup_steps), 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clip by the global gradient norm (trainer.gradient_clip_val) and log that norm
        (``train/grad_norm``, before clipping).

        Lightning's mixed-precision plugin refuses any clipping with a fused AdamW (the default
        on CUDA), because with fp16 the gradients would still carry the loss scale. bf16 and
        fp32 have no loss scaler, so the gradients are clipped here (``optim.clip_by_global_norm``:
        with a fused AdamW, by the kernel's ``grad_scale``, from the norms the non-finite guard
        read this step); with a scaler (16-mixed) Lightning's own handling applies.

        The last hook before ``optimizer.step``: ``step_health`` hands the optimizer's kernel
        this step's skip flag and clipping factor here, clipping or not."""
        health = self.step_health
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is not None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
        elif gradient_clip_val:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: only "
                                 "'norm' is supported")
            total, health.grad_scale = clip_by_global_norm(optimizer, float(gradient_clip_val),
                                                           scaler, health.grad_norms)
            if total is not None:
                # like train/loss: written by monitoring.LoggedLater without a host wait
                self.log("train/grad_norm", total, sync_dist=False, logger=False)
        health.hand_to(optimizer)

    # ---- checkpoints ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" not in checkpoint:
            raise KeyError("checkpoint has no 'ema' entry: not written by this project's FLM code")
        self.ema.load_state_dict(checkpoint["ema"], checkpoint.get("global_step"))

    # ---- sampling -----------------------------------------------------------------
    def log_samples(self, label: str) -> list[str]:
        """Generate ``sampling.print_samples`` sequences with the EMA weights (seeded by
        ``seed``) and write them to the log; the module's train/eval mode is restored."""
        sc = self.config.sampling
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        was_training = self.training
        self.ema.to(self.device)
        with self.ema.swapped_in(self.backbone):
            self.eval()
            tokens = self.generate(sc.print_samples, int(sc.steps[0]), generator,
                                   STATE_DTYPES[sc.state_dtype])
        self.train(was_training)
        texts = self.tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)
        for i, (text, ids) in enumerate(zip(texts, tokens.tolist())):
            shown = text if text.strip() else (  # e.g. an untrained model: all one special token
                "(only special tokens) " + self.tokenizer.decode(ids[:16]) + " ...")
            log.info("sample %d (%d steps), %s: %s", i, int(sc.steps[0]), label, shown)
        return texts

    @torch.no_grad()
    def generate(self, num_samples: int, steps: int, generator: torch.Generator | None = None,
                 state_dtype: torch.dtype = torch.float32, prompt_ids=None,
                 known_mask=None) -> torch.Tensor:
        """Tokens (num_samples, L) with the current backbone weights, by the registry's sampler:
        Euler (docs/math.md §4), FMLM's Euler with two times (§6), or stage 1's flow map with
        the teacher's velocity (§5); ``prompt_ids`` / ``known_mask`` condition it (§9,
        models/generate.py). (num_samples * B, L) for B prompt rows."""
        sc = self.config.sampling
        teacher = self.spec.sampling_teacher
        return generate(self.backbone, prompt_ids, known_mask, steps=steps,
                        num_samples=num_samples, generator=generator,
                        teacher=self.teacher(teacher) if teacher else None,
                        two_times=self.spec.sampler_two_times, length=int(self.config.model.length),
                        denominator_eps=sc.denominator_eps, state_dtype=state_dtype,
                        position_chunk=sc.position_chunk, sampler=self.spec.sampler)


class FLM(FlowLM):
    """algo=flm: cross-entropy denoiser on the one-hot flow (docs/math.md §3-4)."""

    spec = algorithm("flm")

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        super().__init__(config, vocab_size, tokenizer)

    val_loss_is_cross_entropy = True

    def compute_loss(self, batch: dict, step: int, batch_idx: int) -> torch.Tensor:
        tokens, mask = batch["input_ids"], batch["attention_mask"]
        t = self.draw_times(tokens.shape[0], step, batch_idx)
        gamma = self.table.gamma_of_alpha(t)
        slot, _ = self._slot(batch_idx)
        path = self.config.training.input_path
        # drawn here, outside the compiled forward: a seeded generator inside it breaks the graph
        noise = input_noise(tokens, *self.backbone.input_embedding.shape, path,
                            self.noise_generator(step, slot))

        def noisy(network):  # built inside the backbone's forward (models/dit.py: FSDP)
            return noisy_input(network, tokens, gamma, path, noise)

        log_weight = self.loss_weighting(t) if self.loss_weighting is not None else None
        return self.spec.loss(self.backbone, noisy, t, tokens, mask, log_weight)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        if self.config.data.name == "synthetic":  # gap to the Bayes-optimal denoiser
            self._log_bayes_gap(batch["input_ids"], batch_idx)
        return loss

    def _log_bayes_gap(self, tokens: torch.Tensor, batch_idx: int) -> None:
        """val/gap, val/gap_bin<k>: this model's cross-entropy minus the exact denoiser's on
        the same x_γ (exact_denoiser.gap_metrics), times drawn like val/loss's."""
        if "_bayes" not in self.__dict__:  # a plain attribute: not a child module, not saved
            self.__dict__["_bayes"] = gap_denoiser(self.config.data)
        if self.__dict__["_bayes"] is None:
            return
        step = -1 - batch_idx
        t = self.draw_times(tokens.shape[0], step, 0)
        generator = self.noise_generator(step, self._slot(0)[0], stream=3)
        metrics = gap_metrics(self.backbone, self.__dict__["_bayes"], tokens, t,
                              self.table.gamma_of_alpha(t), generator)
        for key, (value, count) in metrics.items():
            self.log(key, value.float(), sync_dist=True, batch_size=count)


class FlowMapDistillation(FlowLM):
    """Shared glue of both distillation stages: frozen teachers and interval draws.

    Teachers live in a plain dict, not as registered children: they are not in
    ``parameters()`` (the optimiser), ``state_dict()`` (checkpoints) or the EMA,
    and ``train()`` does not switch them out of eval mode. They follow the
    module's device on use.
    """

    loss_weight_times = 1  # w_phi(s): the paper's weighting of stage 1 reads the start time only

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        super().__init__(config, vocab_size, tokenizer)
        # the per-token loss of this stage on training.input_path (flow/registry.py), compiled
        # whole when compiling (under FSDP configure_model compiles the blocks one by one)
        objective = self.spec.loss_for(config.training.input_path)
        self.objective = objective if self.sharded else compile_loss(objective, self.speed)

    def _add_teachers(self) -> torch.nn.Module:
        """Load the registry's teachers of this algorithm; returns the first (the FLM one)."""
        for spec in self.spec.teachers:
            self._teachers[spec.name] = self._load_teacher(spec)
        return self._teachers[self.spec.teachers[0].name]

    def _load_teacher(self, spec: Teacher) -> torch.nn.Module:
        key = f"algo.{spec.key}"
        path = OmegaConf.select(self.config, key)
        if path == ORACLE:  # the exact denoiser of data=synthetic: distillation in isolation
            teacher = oracle_teacher(self.config.data, key, self.vocab_size, spec.algo)
        else:
            teacher = load_teacher(path, key, self.config.model, self.vocab_size, spec.algo)
        if compile_requested(self.config):
            compile_network(teacher)
        return teacher

    def _restart_ema(self) -> None:
        """EMA from the student's initial (teacher-derived) weights."""
        self.ema = EMA(self.backbone, self.config.training.ema, self.speed)

    def draw_interval(self, n: int, step: int, batch_idx: int) -> Interval:
        """(s, u, t) per sequence (docs/math.md §5): d like FLM's times, s and the boundary seeded."""
        ac = self.config.algo
        length = self.draw_times(n, step, batch_idx)
        slot, _ = self._slot(batch_idx)
        position, boundary = torch.rand(2, n, generator=self.noise_generator(step, slot, 3),
                                        device=self.device, dtype=torch.float64)
        s, t = interval_endpoints(length, position, boundary, ac.boundary_prob, ac.add_boundary)
        return Interval.from_endpoints(self.table, s, t)

    def reduce(self, per_token: torch.Tensor, interval: Interval, mask: torch.Tensor,
               ) -> torch.Tensor:
        log_weight = (self.loss_weighting(interval.s.float())
                      if self.loss_weighting is not None else None)
        return masked_token_mean(weighted_loss(per_token, log_weight), mask)

    def compute_loss(self, batch: dict, step: int, batch_idx: int) -> torch.Tensor:
        """The stage's loss (``self.objective``, the registry's) on its networks in the
        loss's argument order, the registry's teachers then the trained network (stage 1:
        the FLM teacher, the map; stage 2: the FLM teacher, the stage-1 map, the FMLM
        student), over a drawn interval."""
        tokens, mask = batch["input_ids"], batch["attention_mask"]
        interval = self.draw_interval(tokens.shape[0], step, batch_idx)
        networks = [*(self.teacher(spec.name) for spec in self.spec.teachers), self.backbone]
        noise = self._noise(networks, tokens, step, batch_idx)
        return self.reduce(self.objective(*networks, tokens, interval, noise), interval, mask)

    def _noise(self, networks, tokens: torch.Tensor, step: int, batch_idx: int) -> torch.Tensor:
        """eps @ [E_1 | ...] (dspace) or eps itself (B, L, V) (reference), keyed by slot."""
        slot, _ = self._slot(batch_idx)
        return distillation_noise(networks, tokens, self.vocab_size,
                                  self.config.training.input_path,
                                  self.noise_generator(step, slot))


class FLMDistill(FlowMapDistillation):
    """algo=flm_distill: stage-1 flow map X = x + Δ·v_T + ½Δ²·g_θ (docs/math.md §5)."""

    spec = algorithm("flm_distill")

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        super().__init__(config, vocab_size, tokenizer)
        teacher = self._add_teachers()
        # overwritten by Lightning's restore when resuming from this stage's checkpoint
        initialise_student(self.backbone, teacher, zero_output_layer=True)
        self._restart_ema()


class FLMDistillSecond(FlowMapDistillation):
    """algo=flm_distill_second (FMLM): one network regressed on the stage-1 map (docs/math.md §6)."""

    spec = algorithm("flm_distill_second")
    loss_weight_times = 0  # the paper's stage-2 loss is unweighted (its weighting is never applied)

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        super().__init__(config, vocab_size, tokenizer)
        if config.algo.learnable_loss_weighting:
            log.warning("algo.learnable_loss_weighting=true has no effect in stage 2: its loss "
                        "is unweighted, as in the paper's code")
        if config.mode == "sample_eval" and not (config.algo.teacher_f_path
                                                 or config.algo.teacher_g_path):
            # the FMLM sampler calls the student only (docs/math.md §6): e.g. a released model
            log.info("sample_eval of a stage-2 model: no teachers loaded (sampling needs none)")
            return
        teacher = self._add_teachers()
        # overwritten by Lightning's restore when resuming from this stage's checkpoint
        initialise_student(self.backbone, teacher, zero_output_layer=False)
        self._restart_ema()


# ---- baselines in the same harness (backbone, data, EMA, checkpoints, sample_eval) ----------
class MDLM(FlowLM):
    """algo=mdlm: masked diffusion (MDLM; math in flow/masked.py).

    The backbone has V + 1 input embeddings and outputs (the mask token is entry V). Times
    are drawn like FLM's (antithetic over the global batch, keyed by batch slot) on
    [training.t_min, training.t_max] (MDLM: [1e-3, 1], set by configs/algo/mdlm.yaml). With
    ``algo.time_conditioning=false`` (MDLM's OWT/LM1B setting) the network gets t = 0
    always, so its adaLN modulation is a learnt constant; with true it gets the time t.
    """

    spec = algorithm("mdlm")
    val_loss_is_cross_entropy = True

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        super().__init__(config, vocab_size, tokenizer)
        self.mask_index = vocab_size

    def extra_inputs(self, config: DictConfig) -> int:
        return 1  # the mask token, entry V

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.config.algo.time_conditioning else torch.zeros_like(t)

    def compute_loss(self, batch: dict, step: int, batch_idx: int) -> torch.Tensor:
        tokens, mask = batch["input_ids"], batch["attention_mask"]
        eps = float(self.config.algo.noise_eps)
        t = self.draw_times(tokens.shape[0], step, batch_idx)
        slot, _ = self._slot(batch_idx)
        xt = masked.mask_tokens(tokens, t, self.mask_index, eps, self.noise_generator(step, slot))
        logits = self.backbone(lambda net: net.embed_tokens(xt), self.time_input(t))
        per_token = self.spec.loss(logits, tokens, xt, t, self.mask_index, eps)
        return masked_token_mean(per_token, mask)

    @torch.no_grad()
    def generate(self, num_samples: int, steps: int, generator: torch.Generator | None = None,
                 state_dtype: torch.dtype = torch.float32, prompt_ids=None,
                 known_mask=None) -> torch.Tensor:
        """Tokens (num_samples, L): MDLM's ancestral sampler with ``steps`` steps from t = 1
        to algo.sampling_t_final, then noise removal (algo.noise_removal)."""
        _unconditional(self.spec, prompt_ids)
        ac, net = self.config.algo, self.backbone
        chunk = int(self.config.sampling.position_chunk)

        def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            hidden, c = net.features(net.embed_tokens(xt), self.time_input(t))
            probs = [torch.softmax(net.head(hidden[:, i:i + chunk], c)[..., :self.mask_index]
                                   .to(state_dtype), dim=-1)
                     for i in range(0, hidden.shape[1], chunk)]
            return torch.cat(probs, dim=1)

        return self.spec.sampler(denoise, num_samples, int(self.config.model.length),
                                       self.mask_index, steps, float(ac.sampling_t_final),
                                       bool(ac.noise_removal), float(ac.noise_eps), generator,
                                       self.device)


class AR(FlowLM):
    """algo=ar: next-token prediction with the same DiT under causal attention
    (flow/autoregressive.py).

    The time input is always 0: the adaLN modulation is then a learnt constant (DUO's AR
    passes no time). ``algo.first_token`` chooses how a sequence starts: ``bos`` (DUO) reads
    x[:, :-1] and predicts x[:, 1:] and samples from BOS; ``start`` prepends an extra entry V
    (V + 1 input embeddings) and scores and samples all L tokens. Sampling is ancestral at
    temperature 1 over the full softmax, one network call per drawn token, without a KV
    cache (the whole prefix is re-read each call).
    """

    spec = algorithm("ar")
    val_loss_is_cross_entropy = True

    def __init__(self, config: DictConfig, vocab_size: int, tokenizer=None) -> None:
        mode = config.algo.first_token
        if mode == "bos" and getattr(tokenizer, "bos_token_id", None) is None:
            raise ConfigError(
                f"algo.first_token=bos needs a tokenizer with a BOS token; data="
                f"{config.data.name} has none: set algo.first_token=start")
        super().__init__(config, vocab_size, tokenizer)
        self.start_index = vocab_size if mode == "start" else None
        self._warned_steps = False

    def extra_inputs(self, config: DictConfig) -> int:
        return 1 if config.algo.first_token == "start" else 0  # the start entry, V

    def _zero_time(self, n: int) -> torch.Tensor:
        return torch.zeros(n, device=self.device)

    def compute_loss(self, batch: dict, step: int, batch_idx: int) -> torch.Tensor:
        tokens, mask = batch["input_ids"], batch["attention_mask"]
        inputs, targets, target_mask = shift_for_next_token(
            tokens, mask, self.config.algo.first_token, self.start_index)
        logits = self.backbone(lambda net: net.embed_tokens(inputs), self._zero_time(len(tokens)))
        return masked_token_mean(self.spec.loss(logits, targets, self.vocab_size), target_mask)

    @property
    def calls_per_sample(self) -> int:
        """Network calls (= drawn tokens) per sample: L - 1 from BOS, L from the start entry."""
        length = int(self.config.model.length)
        return length - 1 if self.start_index is None else length

    @torch.no_grad()
    def generate(self, num_samples: int, steps: int, generator: torch.Generator | None = None,
                 state_dtype: torch.dtype = torch.float32, prompt_ids=None,
                 known_mask=None) -> torch.Tensor:
        """Tokens (num_samples, L); with first_token=bos the first one is BOS. ``steps`` is no
        knob here: the sampler always makes ``calls_per_sample`` calls (logged when it differs,
        since sample_eval's NFE column reads steps x network_calls_per_step)."""
        if steps != self.calls_per_sample and not self._warned_steps:
            log.warning("algo=ar draws one token per network call (%d calls per sample); "
                        "sampling.steps=%d does not change it, pass sampling.steps=[%d] for "
                        "sample_eval's NFE column to be right", self.calls_per_sample, steps,
                        self.calls_per_sample)
            self._warned_steps = True
        _unconditional(self.spec, prompt_ids)
        net = self.backbone
        first = self.start_index if self.start_index is not None else self.tokenizer.bos_token_id
        prefix = torch.full((num_samples, 1), int(first), dtype=torch.long, device=self.device)

        def next_logits(x: torch.Tensor) -> torch.Tensor:
            hidden, c = net.features(net.embed_tokens(x), self._zero_time(len(x)))
            return net.head(hidden[:, -1:], c)[:, 0].to(state_dtype)

        out = self.spec.sampler(next_logits, prefix, self.calls_per_sample, self.vocab_size,
                                    generator)
        return out if self.start_index is None else out[:, 1:]


def _unconditional(spec: Algorithm, prompt_ids) -> None:
    if prompt_ids is not None:
        raise ConfigError(f"algo={spec.name} samples unconditionally: prompts and infilling "
                          "(mode=generate, docs/math.md §9) need an FLM, stage-1 or FMLM model")


MODULES: dict[str, type[FlowLM]] = {m.spec.name: m for m in (FLM, FLMDistill, FLMDistillSecond,
                                                             MDLM, AR)}


def algorithm_class(name: str) -> type[FlowLM]:
    """The Lightning module of ``algo=<name>`` (ConfigError for an unknown name)."""
    return MODULES[algorithm(name).name]
