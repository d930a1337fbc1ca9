"""Next-token prediction: the math of the ``algo=ar`` baseline.

Two ways to start a sequence (``algo.first_token``):

* ``bos`` (DUO's AR baseline): every data sequence starts with BOS; the network reads
  x[:, :-1] and predicts x[:, 1:], the first token is given (not scored), and sampling starts
  from BOS;
* ``start``: an extra vocabulary entry ``start_index`` (= V) is prepended; the network reads
  [start, x[:, :-1]] and predicts all L tokens (the whole sequence is scored; sampling needs
  no data token to start from). For sources without BOS, e.g. data=synthetic.

The network gives logits over its whole output vocabulary; entries at or above
``num_real`` (the start entry) are excluded from the softmax (logit -inf).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from flow.flow_map import softmax_wide

FIRST_TOKEN_MODES = ("bos", "start")


def shift_for_next_token(tokens: torch.Tensor, mask: torch.Tensor, first_token: str,
                         start_index: int | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, target mask) for teacher forcing.

    tokens, mask: (B, L). ``bos``: (B, L - 1) each, inputs x[:, :-1], targets x[:, 1:].
    ``start``: (B, L) each, inputs [start_index, x[:, :-1]], targets x.
    """
    if first_token == "bos":
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    if first_token == "start":
        if start_index is None:
            raise ValueError("first_token='start' needs start_index")
        start = torch.full_like(tokens[:, :1], start_index)
        return torch.cat([start, tokens[:, :-1]], dim=1), tokens, mask
    raise ValueError(f"first_token={first_token!r}; expected one of {FIRST_TOKEN_MODES}")


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor, num_real: int) -> torch.Tensor:
    """-log softmax(logits[..., :num_real])[target] per position: (B, L', V'), (B, L') ->
    (B, L') float32 (output entries >= num_real have logit -inf)."""
    real = logits[..., :num_real].float()
    return F.cross_entropy(real.flatten(0, 1), targets.flatten(),
                           reduction="none").view_as(targets)


NextLogitsFn = Callable[[torch.Tensor], torch.Tensor]  # prefix (B, k) -> last logits (B, V')


@torch.no_grad()
def sample_autoregressive(next_logits: NextLogitsFn, prefix: torch.Tensor, new_tokens: int,
                          num_real: int, generator: torch.Generator | None = None,
                          ) -> torch.Tensor:
    """Ancestral sampling at temperature 1 over the full softmax (no top-k / nucleus).

    prefix: (B, k) tokens to condition on; ``next_logits(x)`` gives the logits of the token
    after x, (B, V'). Returns (B, k + new_tokens): the prefix followed by the drawn tokens.
    """
    x = prefix
    for _ in range(new_tokens):
        logits = next_logits(x)[:, :num_real]
        probs = softmax_wide(logits)
        y = torch.multinomial(probs, 1, generator=generator)
        x = torch.cat([x, y.to(x.dtype)], dim=1)
    return x
