"""Backbones from checkpoints: this project's, and the paper's released ones.

``load_backbone(path)`` accepts

* a checkpoint written by this project's training (Lightning ``.ckpt`` with our
  ``hyper_parameters.config``, ``state_dict`` and ``ema = {decay, num_updates, shadow}``);
* a checkpoint of the paper's code (``david3684/flm``; ``lm1b_flm.ckpt``,
  ``owt_fmlm.ckpt``, ...): ``state_dict`` keys ``backbone.<upstream name>`` and
  ``ema = {decay, num_updates, shadow_params}``, the shadow a list in the order of
  the upstream DIT's trainable ``named_parameters()``;
* a Hugging Face folder of the paper's ``DIT`` (``PyTorchModelHubMixin``: ``config.json``
  and ``model.safetensors`` or ``pytorch_model.bin``), or a Hub repo id ``owner/name``
  (downloaded with ``huggingface_hub`` when online).

The paper's backbone computes what ours does (models/dit.py follows its
conventions); only the parameter names differ, mapped in ``UPSTREAM_RENAMES``.
The network is built from the weights: vocabulary, widths, blocks, heads (from the
rotary table) and one or two time embeddings come from tensor shapes and names; a
saved config or ``algo.name`` that disagrees is logged, an unknown name is a log
note, and only what cannot run (a missing tensor, a wrong shape) is an error. The
model and algo config nodes an upstream checkpoint implies are built here too
(``config_nodes``), so evaluation and distillation rebuild it in one place.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from data.offline import offline_by_env, offline_reason
from flow.registry import algorithm
from models.dit import ROTARY_BASE, TIME_FREQUENCY_DIM, DiT
from runtime.checkpointing import load_checkpoint_file
from runtime.config import ConfigError

log = logging.getLogger(__name__)

# algo.name a paper-layout checkpoint may store (the paper's names and ours) -> ours
UPSTREAM_ALGOS = {"flm": "flm", "flm_distill": "flm_distill",
                  "flm_semigroup_distill": "flm_distill", "flm_distill_double": "flm_distill_second",
                  "flm_distill_second": "flm_distill_second"}
# our algorithms a paper-layout backbone can run as; those whose network takes (s, t)
PAPER_ALGOS = tuple(dict.fromkeys(UPSTREAM_ALGOS.values()))
PAPER_TWO_TIME_ALGOS = tuple(a for a in PAPER_ALGOS if algorithm(a).two_times)
UPSTREAM_SOFTCAP = 50.0  # the paper's DDiTBlock passes softcap=50 to flash-attn in every block
UPSTREAM_DROPOUT = 0.1  # the paper's model.dropout default, used when a checkpoint does not say
HUB_CONFIG = "config.json"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".md")
# our parameter name -> the paper's (regex on the full name); names not listed are the same
UPSTREAM_RENAMES = ((r"^input_embedding$", "vocab_embed.embedding"),
                    (r"^time_embedding\.", "sigma_map."),
                    (r"^second_time_embedding\.", "sigma_map_prime."),
                    (r"^(blocks\.\d+)\.qkv\.", r"\1.attn_qkv."),
                    (r"^(blocks\.\d+)\.modulation\.", r"\1.adaLN_modulation."),
                    (r"^output_layer\.norm\.", "output_layer.norm_final."),
                    (r"^output_layer\.modulation\.", "output_layer.adaLN_modulation."))
UPSTREAM_LOSS_WEIGHTING = "learnable_loss_weighting."  # training-only; not part of our backbone
UPSTREAM_ROTARY = "rotary_emb.inv_freq"  # a saved buffer; ours is recomputed (checked equal)


@dataclass(frozen=True)
class BackboneSettings:
    """What a checkpoint says (or its shapes imply) about its backbone."""

    vocab_size: int
    length: int
    hidden_size: int
    n_blocks: int
    n_heads: int
    cond_dim: int
    mlp_ratio: int
    double_temb: bool  # the network takes two times (s, t)
    algo: str | None  # flm | flm_distill | flm_distill_second; None where not knowable
    dropout: float
    attn_softcap: float | None
    causal: bool
    source: str  # project | paper-lightning | paper-hub
    global_step: int | None = None
    # two times, one time embedding (the paper's double_temb=false): the paper's DIT embeds
    # both times with sigma_map and sums them; loaded as a second embedding holding a copy
    shared_time_embedding: bool = False
    network_vocab: int | None = None  # the backbone's own rows when they differ from the data
    # vocabulary (vocab_size): the MDLM mask token, the AR start token
    saved_config: Any = field(default=None, compare=False, repr=False)  # ours: the run's config

    def model_config(self) -> dict[str, Any]:
        """Our ``model`` config node's architecture keys for this backbone."""
        keys = ("length", "hidden_size", "n_blocks", "n_heads", "cond_dim", "mlp_ratio",
                "dropout", "attn_softcap")
        return {"type": "dit", **{k: getattr(self, k) for k in keys}}


def build_from_settings(settings: BackboneSettings) -> DiT:
    return DiT(vocab_size=settings.network_vocab or settings.vocab_size, length=settings.length,
               hidden_size=settings.hidden_size, n_blocks=settings.n_blocks,
               n_heads=settings.n_heads, cond_dim=settings.cond_dim, dropout=settings.dropout,
               mlp_ratio=settings.mlp_ratio, double_temb=settings.double_temb,
               attn_softcap=settings.attn_softcap, causal=settings.causal)


def upstream_name(ours: str) -> str:
    """The paper's name of our backbone parameter ``ours``."""
    for pattern, replacement in UPSTREAM_RENAMES:
        renamed, count = re.subn(pattern, replacement, ours)
        if count:
            return renamed
    return ours


def upstream_parameter_order(n_blocks: int, double_temb: bool,
                             loss_weighting: list[str]) -> list[str]:
    """The paper's DIT trainable parameters in ``named_parameters()`` order (its EMA list).

    Registration order of the paper's DIT: vocab_embed, sigma_map, sigma_map_prime,
    rotary_emb (a buffer), learnable_loss_weighting, blocks (norm1, attn_qkv, attn_out,
    norm2, mlp, adaLN_modulation), output_layer (norm_final, linear, adaLN_modulation).
    ``loss_weighting``: the ``learnable_loss_weighting.*`` names, in their saved order.
    """
    mlp = ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    names = ["vocab_embed.embedding"] + [f"sigma_map.{n}" for n in mlp]
    if double_temb:
        names += [f"sigma_map_prime.{n}" for n in mlp]
    names += loss_weighting
    for i in range(n_blocks):
        names += [f"blocks.{i}.{n}" for n in
                  ["norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", *mlp,
                   "adaLN_modulation.weight", "adaLN_modulation.bias"]]
    names += ["output_layer.norm_final.weight", "output_layer.linear.weight",
              "output_layer.linear.bias", "output_layer.adaLN_modulation.weight",
              "output_layer.adaLN_modulation.bias"]
    return names


# ---- reading files ---------------------------------------------------------------------------
@dataclass
class _Source:
    kind: str  # project | paper-lightning | paper-hub
    path: str
    checkpoint: dict | None = None  # Lightning checkpoints
    weights: dict[str, torch.Tensor] | None = None  # Hub weights (upstream names)
    config: dict | None = None  # Hub config.json


def _looks_like_repo_id(text: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None
            and not text.endswith(CHECKPOINT_SUFFIXES + TEXT_SUFFIXES))


def _download(repo_id: str, what: str) -> Path:
    # an unreachable Hub is said now, not after the client's retries (an offline variable set:
    # the client reads its cache)
    offline = None if offline_by_env() else offline_reason()
    if offline is not None:
        raise ConfigError(
            f"{what}={repo_id}: no such file or folder here, and the Hugging Face Hub was not "
            f"asked ({offline}). Download it where the Hub is reachable (huggingface-cli "
            f"download {repo_id} --local-dir DIR) and pass {what}=DIR")
    try:
        from huggingface_hub import snapshot_download  # Hub repo ids only
        folder = snapshot_download(repo_id, allow_patterns=[HUB_CONFIG, *HUB_WEIGHTS])
    except Exception as err:  # offline, unknown repo, no permission, ...
        raise ConfigError(
            f"{what}={repo_id}: no such file or folder here, and the Hugging Face Hub repo "
            f"{repo_id!r} could not be fetched ({type(err).__name__}: {err}). Offline: download "
            f"it where there is network (huggingface-cli download {repo_id} --local-dir DIR) "
            f"and pass {what}=DIR") from err
    log.info("%s=%s: Hub repo downloaded to %s", what, repo_id, folder)
    return Path(folder)


def _read_hub_folder(folder: Path, what: str) -> _Source:
    config = json.loads((folder / HUB_CONFIG).read_text())
    for name in HUB_WEIGHTS:
        file = folder / name
        if file.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file  # installed with transformers, not by us
                weights = load_file(str(file))
            else:
                weights = torch.load(file, map_location="cpu", weights_only=True)
            break
    else:
        raise ConfigError(f"{what}={folder}: a Hugging Face folder needs one of {HUB_WEIGHTS} "
                          f"next to {HUB_CONFIG}; found {sorted(p.name for p in folder.iterdir())}")
    weights = {_strip(k): v for k, v in weights.items()}
    return _Source("paper-hub", str(folder), weights=weights, config=config)


def _strip(key: str) -> str:
    key = key.replace("._orig_mod.", ".").replace("_orig_mod.", "")
    return key[len("backbone."):] if key.startswith("backbone.") else key


def check_location(path: str | Path, what: str) -> None:
    """Cheap check before any work: ``path`` is a file, a folder with config.json, or a Hub
    repo id (fetched later); otherwise one ConfigError naming ``what``."""
    text = str(path).strip()
    file = Path(text).expanduser()
    if file.is_file() or (file.is_dir() and (file / HUB_CONFIG).is_file()):
        return
    if file.is_dir():
        read_source(file, what)  # raises: a directory without config.json
    if not _looks_like_repo_id(text):
        raise ConfigError(f"{what}={path}: no such file; point it to a trained checkpoint "
                          "(<save_dir>/checkpoints/last.ckpt of the teacher run), a released "
                          "checkpoint of the paper, a Hugging Face folder or a Hub repo id")


def read_source(path: str | Path, what: str = "checkpoint") -> _Source:
    """Classify and read ``path`` (see the module docstring); one ConfigError naming ``what``
    and the path for anything that is not a checkpoint."""
    text = str(path).strip()
    file = Path(text).expanduser()
    if file.is_dir():
        if (file / HUB_CONFIG).is_file():
            return _read_hub_folder(file, what)
        raise ConfigError(
            f"{what}={file} is a directory without {HUB_CONFIG}: expected a checkpoint file "
            "(.ckpt, e.g. <save_dir>/checkpoints/last.ckpt) or a Hugging Face model folder "
            f"holding {HUB_CONFIG} and {' or '.join(HUB_WEIGHTS)}")
    if not file.exists():
        if _looks_like_repo_id(text):
            return _read_hub_folder(_download(text, what), what)
        raise ConfigError(f"{what}={file}: no such file. Expected a checkpoint file (.ckpt), a "
                          "Hugging Face model folder, or a Hub repo id owner/name")
    with open(file, "rb") as f:
        head = f.read(4)
    if file.suffix.lower() in TEXT_SUFFIXES or head[:2] not in (b"PK", b"\x80\x02",
                                                                 b"\x80\x03", b"\x80\x04"):
        kind = "a YAML/text file" if file.suffix.lower() in (".yaml", ".yml") else \
            f"not a torch file (it starts with {head!r})"
        raise ConfigError(
            f"{what}={file} is {kind}, not a checkpoint: pass the .ckpt written by training "
            "(<save_dir>/checkpoints/last.ckpt), a released checkpoint of the paper, or a "
            f"Hugging Face folder with {HUB_CONFIG}")
    checkpoint = load_checkpoint_file(file, what)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ConfigError(
            f"{what}={file} is a torch file but not a training checkpoint (it holds {keys}; "
            "expected a Lightning checkpoint with 'state_dict' and 'ema'): pass the .ckpt "
            "written by training or a released checkpoint of the paper")
    state = {_strip(k) for k in checkpoint["state_dict"]}
    if "input_embedding" in state:
        return _Source("project", str(file), checkpoint=checkpoint)
    if "vocab_embed.embedding" in state:
        return _Source("paper-lightning", str(file), checkpoint=checkpoint)
    raise ConfigError(f"{what}={file}: a Lightning checkpoint without a known backbone (no "
                      "backbone.input_embedding nor backbone.vocab_embed.embedding): not a "
                      "checkpoint of this project or of the paper's FLM code")


# ---- settings --------------------------------------------------------------------------------
def _select(config: Any, key: str) -> Any:
    if config is None:
        return None
    if not isinstance(config, DictConfig):
        config = OmegaConf.create(config)
    return OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)


def _network_vocab(state_dict: dict) -> int | None:
    """Rows of the saved backbone's input embedding (None when it is not saved)."""
    embedding = state_dict.get("backbone.input_embedding")
    return None if embedding is None else int(embedding.shape[0])


def _project_settings(source: _Source, what: str) -> tuple[BackboneSettings, DictConfig]:
    hyper = source.checkpoint.get("hyper_parameters") or {}
    if "config" not in hyper or "vocab_size" not in hyper:
        raise ConfigError(f"{what}={source.path} has no saved config/vocab_size: not a "
                          "checkpoint written by this project's training")
    saved = OmegaConf.create(hyper["config"])
    if "attn_softcap" not in saved.model:
        raise ConfigError(
            f"{what}={source.path} was written before the backbone followed the paper's "
            "conventions (raw-t time features, half-split rotary, attention softcap): its "
            "weights compute something else under the current code; retrain it")
    model = saved.model
    settings = BackboneSettings(
        vocab_size=int(hyper["vocab_size"]), length=int(model.length),
        hidden_size=int(model.hidden_size), n_blocks=int(model.n_blocks),
        n_heads=int(model.n_heads), cond_dim=int(model.cond_dim),
        mlp_ratio=int(model.mlp_ratio), double_temb=bool(saved.algo.double_temb),
        algo=str(saved.algo.name), dropout=float(model.dropout),
        attn_softcap=None if model.attn_softcap is None else float(model.attn_softcap),
        causal=algorithm(str(saved.algo.name)).causal, source="project",
        global_step=source.checkpoint.get("global_step"), saved_config=saved,
        network_vocab=_network_vocab(source.checkpoint.get("state_dict") or {}))
    return settings, saved


def _paper_algo(name: Any, two_embeddings: bool, caller_algo: str | None,
                what: str) -> str | None:
    """Our algorithm for a paper-layout backbone with one or two time embeddings.

    The weights decide the network; the algorithm is how it is run, which they leave open
    (one embedding: FLM, or a two-time map whose one embedding serves both times; two: one
    of the two distillation stages). The stored ``algo.name`` picks it when it is a name we
    know and the weights allow it; otherwise ``caller_algo`` (the algorithm the caller runs)
    when the weights allow it; otherwise FLM for one embedding and None (not knowable) for
    two. Every stored name that is not taken is logged.
    """
    allowed = PAPER_TWO_TIME_ALGOS if two_embeddings else PAPER_ALGOS
    stored = UPSTREAM_ALGOS.get(str(name)) if name is not None else None
    if name is not None and stored is None:
        log.info("%s: the saved algo.name=%s is not a name this loader knows; the network is "
                 "built from its weights (%s time embedding%s)", what, name,
                 "two" if two_embeddings else "one", "s" if two_embeddings else "")
    elif stored is not None and stored not in allowed:
        log.info("%s: the saved algo.name=%s (algo=%s) takes one time, but the weights hold a "
                 "second time embedding: built as a two-time network", what, name, stored)
    if stored in allowed:
        if caller_algo is not None and caller_algo != stored:
            log.info("%s: the checkpoint's algo.name=%s (algo=%s) is used, not algo=%s",
                     what, name, stored, caller_algo)
        return stored
    if caller_algo in allowed:
        return caller_algo
    return None if two_embeddings else "flm"


def _paper_settings(weights: dict[str, torch.Tensor], config: Any, vocab_hint: Any,
                    length: int | None, step: int | None, source: _Source, what: str,
                    caller_algo: str | None = None) -> BackboneSettings:
    def need(key: str) -> torch.Tensor:
        if key not in weights:
            raise ConfigError(f"{what}={source.path}: key {key!r} is missing from the paper's "
                              "backbone weights")
        return weights[key]

    vocab, hidden = need("vocab_embed.embedding").shape
    cond_dim, freq_dim = need("sigma_map.mlp.0.weight").shape
    if freq_dim != TIME_FREQUENCY_DIM:
        raise ConfigError(f"{what}={source.path}: sigma_map.mlp.0.weight has shape "
                          f"{(cond_dim, freq_dim)}, expected (cond_dim, {TIME_FREQUENCY_DIM})")
    n_blocks = len({k.split(".")[1] for k in weights if re.match(r"blocks\.\d+\.", k)})
    mlp_ratio = need("blocks.0.mlp.0.weight").shape[0] // hidden
    n_heads = _select(config, "model.n_heads")
    if UPSTREAM_ROTARY in weights:
        head_dim = 2 * weights[UPSTREAM_ROTARY].numel()
        if n_heads is not None and int(n_heads) * head_dim != hidden:
            raise ConfigError(f"{what}={source.path}: model.n_heads={n_heads} disagrees with "
                              f"the rotary table ({UPSTREAM_ROTARY}: head size {head_dim})")
        n_heads = hidden // head_dim
        expected = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2).double() / head_dim)
        if not torch.allclose(weights[UPSTREAM_ROTARY].double(), expected, rtol=1e-5):
            raise ConfigError(f"{what}={source.path}: {UPSTREAM_ROTARY} is not the rotary "
                              f"table of base {ROTARY_BASE:g} this backbone computes")
    if n_heads is None:
        raise ConfigError(f"{what}={source.path}: neither a saved model.n_heads nor "
                          f"{UPSTREAM_ROTARY} says the number of heads")
    if _select(config, "algo.causal_attention"):
        raise ConfigError(f"{what}={source.path}: a causal (autoregressive) checkpoint of the "
                          "paper's code; only its FLM/FMLM backbones load here")
    two_embeddings = "sigma_map_prime.mlp.0.weight" in weights
    saved_double = _select(config, "algo.double_temb")
    if saved_double is not None and bool(saved_double) != two_embeddings:
        log.info("%s: algo.double_temb=%s in the saved config, but the weights %s "
                 "sigma_map_prime; built from the weights", what, saved_double,
                 "have" if two_embeddings else "lack")
    algo = _paper_algo(_select(config, "algo.name"), two_embeddings, caller_algo, what)
    # one time embedding in a two-time algorithm: the paper's DIT feeds both times to it
    shared = not two_embeddings and algo is not None and algorithm(algo).two_times
    saved_vocab = vocab_hint if vocab_hint is not None else _select(config, "vocab_size")
    if saved_vocab is not None and int(saved_vocab) != vocab:
        raise ConfigError(f"{what}={source.path}: vocab_size={saved_vocab} saved, but "
                          f"vocab_embed.embedding has shape {(vocab, hidden)}")
    saved_length = _select(config, "model.length")
    if saved_length is None and length is None:
        raise ConfigError(f"{what}={source.path} does not record its sequence length: pass "
                          "model.length=<L> (128 for the paper's LM1B models, 1024 for OWT)")
    dropout = _select(config, "model.dropout")
    return BackboneSettings(
        vocab_size=int(vocab), length=int(saved_length if saved_length is not None else length),
        hidden_size=int(hidden), n_blocks=n_blocks, n_heads=int(n_heads), cond_dim=int(cond_dim),
        mlp_ratio=int(mlp_ratio), double_temb=two_embeddings or shared, algo=algo,
        dropout=float(dropout) if dropout is not None else UPSTREAM_DROPOUT,
        attn_softcap=UPSTREAM_SOFTCAP, causal=False, source=source.kind, global_step=step,
        shared_time_embedding=shared)


# ---- weights ---------------------------------------------------------------------------------
def _paper_weights(source: _Source, use_ema: bool, what: str,
                   ) -> tuple[dict[str, torch.Tensor], Any, Any, int | None]:
    """Upstream-named backbone tensors (EMA ones when asked and saved), config, vocab, step."""
    if source.kind == "paper-hub":
        if use_ema:
            log.info("%s=%s: a Hub folder holds one set of weights (no separate EMA); "
                     "using it", what, source.path)
        config = source.config.get("config", source.config)
        return source.weights, config, source.config.get("vocab_size"), None
    ckpt = source.checkpoint
    weights = {_strip(k): v for k, v in ckpt["state_dict"].items()
               if k.startswith("backbone.")}
    hyper = ckpt.get("hyper_parameters") or {}
    config, step = hyper.get("config"), ckpt.get("global_step")
    ema = ckpt.get("ema")
    if use_ema:
        if not ema or "shadow_params" not in ema:
            raise ConfigError(f"{what}={source.path} has no EMA weights (ema.shadow_params): "
                              "set eval.disable_ema=true to use its live weights")
        loss_weighting = [k for k in weights if k.startswith(UPSTREAM_LOSS_WEIGHTING)]
        order = upstream_parameter_order(
            len({k.split(".")[1] for k in weights if re.match(r"blocks\.\d+\.", k)}),
            "sigma_map_prime.mlp.0.weight" in weights, loss_weighting)
        shadow = list(ema["shadow_params"])
        if len(shadow) != len(order):
            raise ConfigError(f"{what}={source.path}: the EMA list holds {len(shadow)} tensors "
                              f"but the paper's backbone has {len(order)} trainable parameters")
        mapped = {}
        for name, tensor in zip(order, shadow):
            live = weights.get(name)
            if live is None or tuple(live.shape) != tuple(tensor.shape):
                raise ConfigError(
                    f"{what}={source.path}: EMA entry for {name} has shape "
                    f"{tuple(tensor.shape)}, the state_dict's "
                    f"{None if live is None else tuple(live.shape)}")
            mapped[name] = tensor
        weights = {**weights, **mapped}
        log.info("%s: EMA weights (decay %s, %s updates)", what, ema.get("decay"),
                 ema.get("num_updates"))
    return weights, config, hyper.get("vocab_size"), step


def _fill(backbone: DiT, weights: dict[str, torch.Tensor], rename, what: str, path: str) -> None:
    """Copy ``weights[rename(name)]`` into every backbone tensor, shape-checked."""
    state = {}
    for name, now in backbone.state_dict().items():
        key = rename(name)
        if key not in weights:
            raise ConfigError(f"{what}={path}: key {key!r} (backbone {name}, shape "
                              f"{tuple(now.shape)}) is missing from the checkpoint")
        value = weights[key]
        if tuple(value.shape) != tuple(now.shape):
            raise ConfigError(f"{what}={path}: {key!r} has shape {tuple(value.shape)} in the "
                              f"checkpoint but the backbone expects {tuple(now.shape)}")
        state[name] = value
    backbone.load_state_dict(state, strict=True)


def load_backbone(path: str | Path, *, use_ema: bool = True, length: int | None = None,
                  what: str = "checkpoint", algo: str | None = None,
                  ) -> tuple[DiT, BackboneSettings]:
    """The backbone stored at ``path`` and its settings (see the module docstring).

    ``use_ema``: the EMA weights (Lightning checkpoints); ``length``: the sequence length
    when the checkpoint does not record it (Hub folders); ``what``: the config key named in
    errors; ``algo``: the algorithm the caller runs, which decides how a paper-layout
    network is run where its weights and stored name leave that open (``_paper_algo``).
    The network is built from the weights (a stored name that disagrees is logged); every
    tensor is shape-checked, and a missing, unexpected or misshapen one is one
    ``ConfigError`` naming it. The backbone is returned in eval mode, on the CPU.
    """
    return backbone_from_source(read_source(path, what), use_ema=use_ema, length=length,
                                what=what, algo=algo)


def backbone_from_source(source: _Source, *, use_ema: bool = True, length: int | None = None,
                         what: str = "checkpoint", algo: str | None = None,
                         ) -> tuple[DiT, BackboneSettings]:
    """``load_backbone`` on what ``read_source`` read (its checkpoint stays in
    ``source.checkpoint`` for callers that need more of it)."""
    if source.kind == "project":
        settings, _ = _project_settings(source, what)
        ckpt = source.checkpoint
        if use_ema:
            if "ema" not in ckpt:
                raise ConfigError(f"{what}={source.path} has no EMA weights: set "
                                  "eval.disable_ema=true to use its live weights")
            weights = ckpt["ema"]["shadow"]
        else:
            weights = {_strip(k): v for k, v in ckpt["state_dict"].items()
                       if k.startswith("backbone.")}
        backbone = build_from_settings(settings)
        _fill(backbone, weights, lambda name: name, what, source.path)
    else:
        weights, config, vocab, step = _paper_weights(source, use_ema, what)
        settings = _paper_settings(weights, config, vocab, length, step, source, what, algo)
        backbone = build_from_settings(settings)

        def rename(name: str) -> str:
            if settings.shared_time_embedding:
                name = re.sub(r"^second_time_embedding\.", "time_embedding.", name)
            return upstream_name(name)

        used = {rename(n) for n in backbone.state_dict()}
        unexpected = sorted(k for k in weights if k not in used and k != UPSTREAM_ROTARY
                            and not k.startswith(UPSTREAM_LOSS_WEIGHTING))
        if unexpected:
            raise ConfigError(f"{what}={source.path}: unexpected keys {unexpected[:5]} in the "
                              "paper's backbone weights (a variant this loader does not know)")
        _fill(backbone, weights, rename, what, source.path)
        if settings.shared_time_embedding:
            log.info("%s: one time embedding for two times (the paper's double_temb=false): "
                     "sigma_map embeds both and the embeddings are summed", what)
        if any(k.startswith(UPSTREAM_LOSS_WEIGHTING) for k in weights):
            log.info("%s: the paper's learnable_loss_weighting weights are not loaded "
                     "(training-only; our weighting is models/loss_weight.py)", what)
    log.info("%s=%s: %s backbone (algo=%s, V=%d, L=%d, D=%d, %d blocks, %d heads, %s weights)",
             what, source.path, settings.source, settings.algo, settings.vocab_size,
             settings.length, settings.hidden_size, settings.n_blocks, settings.n_heads,
             "EMA" if use_ema else "live")
    return backbone.eval(), settings


# ---- config nodes for evaluation / distillation ----------------------------------------------
ALGO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "algo"


def config_nodes(path: str | Path, settings: BackboneSettings, config: DictConfig,
                 what: str = "eval.checkpoint_path") -> tuple[DictConfig, DictConfig]:
    """Our ``model`` and ``algo`` config nodes for the checkpoint at ``path``.

    This project's checkpoints: their saved nodes. The paper's: ``config.model`` with the
    checkpoint's architecture, and the defaults of configs/algo/<algo>.yaml; where neither
    the checkpoint nor the loading caller settled its algorithm (two time embeddings and no
    two-time name: ``_paper_algo``), ``config.algo.name`` decides when it is a two-time
    algorithm, else a ConfigError.
    """
    if settings.source == "project":
        return settings.saved_config.model, settings.saved_config.algo
    algo = settings.algo
    if algo is None:
        if config.algo.name not in PAPER_TWO_TIME_ALGOS:
            raise ConfigError(
                f"{what}={path} is a two-time-embedding backbone whose checkpoint does not say "
                "which distillation stage it is: pass algo=flm_distill_second (FMLM, the "
                "released *_fmlm models) or algo=flm_distill")
        algo = config.algo.name
        log.info("%s: taken as algo=%s (from the config)", what, algo)
    model = OmegaConf.merge(config.model, {"name": f"paper-{settings.source}",
                                           **settings.model_config()})
    algo_node = OmegaConf.load(ALGO_CONFIG_DIR / f"{algo}.yaml")
    # the paper's loss-weighting weights are not mapped onto ours (training-only)
    algo_node.learnable_loss_weighting = False
    algo_node.double_temb = settings.double_temb
    return model, algo_node
