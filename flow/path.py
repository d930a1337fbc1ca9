"""The FLM corruption path and time draws (docs/math.md §1-3).

``x_gamma = (1 - gamma)·eps + gamma·e(x)`` lives in R^{L x V}; the backbone
only ever sees ``x_gamma @ E``. Two ways to build that input:

* ``reference``: materialise the one-hot target and the (B, L, V) noise, then
  project densely (what the paper's code does);
* ``dspace``: ``eps @ E ~ N(0, EᵀE)`` per position, so draw ``eta ~ N(0, I_D)``
  and use ``eta · chol(EᵀE)ᵀ``; nothing of size V is created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

INPUT_PATHS = ("dspace", "reference")  # training.input_path; the config check (flow/registry.py) holds it to these


def projection_draw_width(vocab: int, dim: int) -> int:
    """Width of the standard normal that ``gaussian_projection`` turns into ``eps @ E`` for a
    (V, D) embedding: eps itself (V) when V <= D, else eta (D)."""
    return vocab if vocab <= dim else dim


def standard_draw(batch_shape: tuple[int, ...], vocab: int, dim: int,
                  generator: torch.Generator | None, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The standard normal behind one draw of ``eps @ E``: (*batch_shape, width), width from
    ``projection_draw_width``. Drawn apart from the projection so that a compiled network can
    take it as an input: a seeded generator inside a compiled forward breaks its graph."""
    return torch.randn(*batch_shape, projection_draw_width(vocab, dim), generator=generator,
                       device=device, dtype=dtype)


def project_draw(embedding: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """``standard_draw``'s normal -> a draw of ``eps @ E`` with ``eps ~ N(0, I_V)``, without
    forming eps when V > D: ``eta · chol(EᵀE)ᵀ`` (covariance ``EᵀE``), else ``eps @ E``.

    embedding: (V, D); draw: (..., width) -> (..., D), in the draw's dtype. Differentiable
    in ``embedding`` (through the Cholesky factor), which gives an unbiased estimate of the
    reference path's expected gradient. A rank-deficient embedding gives NaNs (no host sync
    here to check ``info``); the trainer's non-finite-loss guard reports them.
    """
    with torch.autocast(device_type=embedding.device.type, enabled=False):
        e = embedding.to(draw.dtype)
        vocab, dim = e.shape
        width = projection_draw_width(vocab, dim)
        if draw.shape[-1] != width:
            raise ValueError(f"a draw of width {draw.shape[-1]} for a ({vocab}, {dim}) "
                             f"embedding; standard_draw gives {width}")
        if vocab <= dim:
            # EᵀE is singular when V <= D, and drawing eps directly is the cheaper
            # of the two there; both are exact draws of the same N(0, EᵀE).
            return draw @ e
        factor, _ = torch.linalg.cholesky_ex(e.T @ e)
        return draw @ factor.T


def gaussian_projection(embedding: torch.Tensor, batch_shape: tuple[int, ...],
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A draw of ``eps @ E`` with ``eps ~ N(0, I_V)``: (V, D) -> (*batch_shape, D)."""
    vocab, dim = embedding.shape
    return project_draw(embedding, standard_draw(batch_shape, vocab, dim, generator,
                                                 embedding.device, dtype))


# ---- noise seen through several embeddings ------------------------------------------
@contextlib.contextmanager
def _ieee_float32_matmuls() -> Iterator[None]:
    """float32 matmuls without TF32 inside (the law of the noise is not rounded to 10 bits)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


_FROZEN_QR: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # one entry: frozen embeddings


def _tensor_key(tensors: list[torch.Tensor]) -> tuple:
    """Identity and content version of tensors: changes when any of them is written."""
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, str(t.device))
                 for t in tensors)


def joint_qr(embeddings: list[torch.Tensor], dtype: torch.dtype,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of A = [E_1 | E_2 | ...] (V, K): Q (V, K') orthonormal, R (K', K), QR = A.

    The leading embeddings that need no gradient (frozen teachers) are factored
    once and cached until one of them is written; the rest B (the student) is
    appended by block Gram-Schmidt with re-orthogonalisation: C = Q_Fᵀ·B,
    P = B - Q_F·C (twice), P = Q_P·R_P, giving A = [Q_F | Q_P]·[[R_F, C], [0, R_P]].
    Per step that is two (V, K_F) x (V, K_S) products and a QR of (V, K_S) instead
    of a QR of the whole (V, K). ``dtype``: the working precision (IEEE, no TF32).
    """
    frozen = 0
    while frozen < len(embeddings) and not embeddings[frozen].requires_grad:
        frozen += 1
    vocab, width = embeddings[0].shape[0], sum(e.shape[1] for e in embeddings)
    with _ieee_float32_matmuls():
        if frozen == 0 or vocab <= width:  # nothing to reuse, or no room for a complement
            return torch.linalg.qr(torch.cat([e.detach().to(dtype) for e in embeddings], dim=1))
        key = _tensor_key(embeddings[:frozen]) + (dtype,)
        if key not in _FROZEN_QR:
            _FROZEN_QR.clear()
            _FROZEN_QR[key] = torch.linalg.qr(
                torch.cat([e.detach().to(dtype) for e in embeddings[:frozen]], dim=1))
        q_f, r_f = _FROZEN_QR[key]
        if frozen == len(embeddings):
            return q_f, r_f
        rest = torch.cat([e.detach().to(dtype) for e in embeddings[frozen:]], dim=1)
        c = q_f.T @ rest
        rest = rest - q_f @ c
        c2 = q_f.T @ rest  # "twice is enough": P orthogonal to Q_F to round-off
        rest = rest - q_f @ c2
        q_p, r_p = torch.linalg.qr(rest)
        r = torch.cat([torch.cat([r_f, c + c2], dim=1),
                       torch.cat([r_p.new_zeros(r_p.shape[0], r_f.shape[1]), r_p], dim=1)])
        return torch.cat([q_f, q_p], dim=1), r


class _JointGaussianProjection(torch.autograd.Function):
    """y = η·R with A = QR (thin QR), i.e. an exact draw of eps @ A (eps ~ N(0, I_V)), any rank.

    Teacher and student embeddings are equal at initialisation, so AᵀA is singular
    and has no Cholesky factor; the QR factorisation of A itself always exists and
    needs no pivoting, jitter or eigendecomposition: with eps = η·Qᵀ + ξ·Q⊥ᵀ (ξ an
    independent standard normal on the complement of range(Q)), eps ~ N(0, I_V)
    and eps @ A = η·R, so y has covariance RᵀR = AᵀA exactly (up to the round-off
    of a backward-stable QR). The backward is the Rao-Blackwellised pathwise
    gradient: the reference path's gradient in A is epsᵀ·dy, dy depends on eps
    only through y (a function of η), and E[eps | η] = η·Qᵀ, so Q·(ηᵀ·dy) is an
    unbiased estimate of the same expected gradient.
    """

    @staticmethod
    def forward(ctx, trained: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                batch_shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        """``trained``: the columns of A that take gradients, its last ones (the embeddings after
        the frozen teachers); the draw itself reads only Q and R."""
        with _ieee_float32_matmuls():
            eta = torch.randn(*batch_shape, r.shape[0], generator=generator,
                              device=q.device, dtype=r.dtype)
            y = eta @ r
        ctx.save_for_backward(q, eta)
        ctx.trained_columns = trained.shape[1]
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        q, eta = ctx.saved_tensors
        # only the trained columns' gradient: Q·(ηᵀ·dy[..., trained]), (V, K_trained)
        grad_trained = grad_y[..., grad_y.shape[-1] - ctx.trained_columns:]
        moment = eta.flatten(0, -2).T @ grad_trained.flatten(0, -2).to(eta.dtype)
        return q @ moment, None, None, None, None


def joint_gaussian_projection(embeddings: list[torch.Tensor], batch_shape: tuple[int, ...],
                              generator: torch.Generator | None = None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One draw of ``eps @ [E_1 | E_2 | ...]`` with eps ~ N(0, I_V), without forming eps.

    embeddings: (V, D_i) each -> (*batch_shape, ΣD_i), with the exact joint covariance.
    Differentiable in the embeddings (see ``_JointGaussianProjection``). Computed in
    ``dtype`` (at least float32, at least the embeddings' precision): a thin QR
    (``joint_qr``: frozen teachers factored once), no float64 and no
    eigendecomposition in training.
    """
    work = torch.promote_types(torch.promote_types(embeddings[0].dtype, dtype), torch.float32)
    with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
        q, r = joint_qr(embeddings, work)
        # the autograd input: the embeddings from the first that trains on (frozen teachers
        # lead); their columns are the last of A, and the backward forms only their gradient
        first = next((i for i, e in enumerate(embeddings) if e.requires_grad), len(embeddings))
        trained = torch.cat([e.to(work) for e in embeddings[first:]] or
                            [q.new_zeros(q.shape[0], 0)], dim=1)
        return _JointGaussianProjection.apply(trained, q, r, tuple(batch_shape),
                                              generator).to(dtype)


# ---- the noisy input seen through one or several embeddings (docs/math.md §1, §3, §5) ----
def clean_projection(networks, tokens: torch.Tensor) -> torch.Tensor:
    """e(x) @ [E_1 | E_2 | ...] = rows of each E: (B, L) -> (B, L, ΣD_i)."""
    return torch.cat([F.embedding(tokens, e) for e in (n.input_embedding for n in networks)], dim=-1)


def noisy_projection(networks, tokens: torch.Tensor, gamma: torch.Tensor,
                     noise_projection: torch.Tensor) -> torch.Tensor:
    """x_γ @ [E_1 | ...] = (1 - γ)·(eps @ [E_1 | ...]) + γ·e(x) @ [E_1 | ...] (docs/math.md §3)."""
    g = gamma.to(noise_projection.dtype).view(-1, 1, 1)  # (B,) -> (B, 1, 1)
    clean = clean_projection(networks, tokens).to(noise_projection.dtype)
    return (1 - g) * noise_projection + g * clean


def noisy_projection_reference(tokens: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor,
                               vocab: int) -> torch.Tensor:
    """x_γ = (1 - γ)·eps + γ·e(x) in V-space (B, L, V)."""
    g = gamma.to(noise.dtype).view(-1, 1, 1)  # (B,) -> (B, 1, 1)
    return (1 - g) * noise + g * F.one_hot(tokens, vocab).to(noise.dtype)


def distillation_noise(networks, tokens: torch.Tensor, vocab_size: int, input_path: str,
                       generator: torch.Generator | None) -> torch.Tensor:
    """The noise of one distillation step: ``eps @ [E_1 | ...]`` (B, L, ΣD) drawn jointly in
    D-space (``dspace``), or ``eps`` itself (B, L, V) (``reference``)."""
    if input_path == "reference":
        return torch.randn(*tokens.shape, vocab_size, generator=generator, device=tokens.device)
    return joint_gaussian_projection([n.input_embedding for n in networks],
                                     tuple(tokens.shape), generator)


def input_noise(tokens: torch.Tensor, vocab: int, dim: int, input_path: str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise of ``noisy_input``, drawn on ``tokens``' device: the standard normal of
    ``standard_draw`` (``dspace``, (B, L, width)) or eps itself (``reference``, (B, L, V)).
    Drawn outside the network (no seeded generator inside a compiled forward)."""
    if input_path == "reference":
        return torch.randn(*tokens.shape, vocab, generator=generator, device=tokens.device)
    return standard_draw(tuple(tokens.shape), vocab, dim, generator, tokens.device)


def noisy_input(backbone, tokens: torch.Tensor, gamma: torch.Tensor, input_path: str,
                noise: torch.Tensor) -> torch.Tensor:
    """``x_gamma @ E`` for clean tokens (B, L) at per-sequence gamma (B,) -> (B, L, D);
    ``noise`` from ``input_noise`` (same path, the backbone's V and D)."""
    if input_path == "reference":
        z = noisy_projection_reference(tokens, gamma.float(), noise, backbone.vocab_size)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return backbone.embed_state(z)
    projected = project_draw(backbone.input_embedding, noise)
    return noisy_projection([backbone], tokens, gamma.float(), projected)


def stratified_times(n_local: int, slot: int, num_slots: int, offset: float | torch.Tensor,
                     t_min: float = 0.0, t_max: float = 1.0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Antithetic (stratified) times over a batch split into ``num_slots`` parts.

    The global batch of ``n_local * num_slots`` draws is ``(offset + k / n) mod 1``
    for k = 0..n-1 with one shared ``offset ~ U[0, 1)``; this returns the part
    owned by ``slot`` (slot = micro-batch index * world size + rank), on ``device``.
    ``offset`` is a host number (a one-element tensor is read as one): the times are
    built on the device from it, so no host-to-device copy stalls the step.
    """
    offset = float(offset)
    total = n_local * num_slots
    k = torch.arange(slot * n_local, (slot + 1) * n_local, device=device, dtype=torch.float64)
    u = torch.remainder(k / total + offset, 1.0)
    return (t_min + (t_max - t_min) * u).float()


def uniform_times(n: int, t_min: float, t_max: float, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    return t_min + (t_max - t_min) * torch.rand(n, generator=generator, device=device)
