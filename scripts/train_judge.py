"""Train a small GPT-2-architecture STAND-IN judge for offline generative perplexity.

The real judge is GPT-2 Large (``eval.gen_ppl_eval_model_name_or_path=gpt2-large``),
loaded from the Hugging Face Hub or cache. Where neither is reachable, this script trains
a tiny GPT-2 (transformers ``GPT2LMHeadModel``) on the embedded default corpus and saves
it with ``save_pretrained``, so that

    python scripts/train_judge.py --out judges/standin
    python -m main mode=sample_eval ... eval.gen_ppl_eval_model_name_or_path=judges/standin

works offline. Its perplexities are NOT comparable to GPT-2 Large numbers; the output
directory carries a README.txt and judge_metadata.json saying so.

Time on a CPU, measured single-threaded on a 2-core machine: 0.32 s a training step of the
default model plus ~22 s for loading and the held-out loss, so the default 1,000 steps take
about 6 minutes on one core (at most that on 2 cores); --steps trades time for a weaker judge.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
DEFAULT_TOKENIZER_FILE = os.path.join(REPO_ROOT, "assets", "embedded_tokenizer.json")
# Special-token spellings tried in order when --bos-token/--eos-token/--pad-token are not given.
SPECIAL_CANDIDATES = {
    "bos": ("[BOS]", "<s>", "<|endoftext|>", "[CLS]"),
    "eos": ("[EOS]", "</s>", "<|endoftext|>", "[SEP]"),
    "pad": ("[PAD]", "<pad>", "<|endoftext|>"),
}
STAND_IN_README = """\
STAND-IN JUDGE: a small GPT-2-architecture model trained by scripts/train_judge.py on
{corpus}. It exists so that generative perplexity can be computed offline. Its numbers
are NOT comparable to GPT-2 Large (the paper's judge) and must be labelled as coming from
this stand-in wherever they are reported. Settings: judge_metadata.json.
"""

logger = logging.getLogger("train_judge")


def load_text_documents(text_file: str) -> list[str]:
    """Documents of a plain-text file: blocks separated by blank lines."""
    with open(text_file, encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    return [b.strip() for b in blocks if b.strip()]


def load_tokenizer(tokenizer_file: str, bos: str | None = None, eos: str | None = None,
                   pad: str | None = None):
    """A ``tokenizers`` JSON file -> PreTrainedTokenizerFast with BOS/EOS/PAD set."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} not found; pass "
                                "--tokenizer-file <tokenizers json>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
    vocab = tokenizer.get_vocab()
    chosen = {}
    for role, given in (("bos", bos), ("eos", eos), ("pad", pad)):
        candidates = (given,) if given else SPECIAL_CANDIDATES[role]
        found = next((c for c in candidates if c in vocab), None)
        if found is None:
            raise ValueError(f"no {role} token among {candidates} in {tokenizer_file}; "
                             f"pass --{role}-token <token in its vocabulary>")
        chosen[f"{role}_token"] = found
    tokenizer.add_special_tokens(chosen)
    return tokenizer


def pack_documents(documents: Sequence[str], tokenizer, context: int) -> torch.Tensor:
    """[BOS] doc [EOS] [BOS] doc [EOS] ... cut into (M, context) blocks (remainder dropped)."""
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    m = len(stream) // context
    if m == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of {context}")
    return torch.tensor(stream[:m * context]).view(m, context)


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int, device: str) -> float:
    """Mean next-token cross-entropy over (M, context) blocks (every block has context - 1
    targets, so the mean of per-batch means weighted by batch size is exact)."""
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size].to(device)
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(blocks)


def train_judge(documents: Sequence[str], tokenizer, out_dir: str, *, n_layer: int = 2,
                n_embd: int = 128, n_head: int = 4, context: int = 128, steps: int = 1000,
                batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                device: str = "cpu", corpus_name: str = "a local corpus"):
    """Train a GPT2LMHeadModel from a GPT2Config and save it (+ tokenizer) to ``out_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    blocks = pack_documents(documents, tokenizer, context)
    n_val = max(1, len(blocks) // 20) if len(blocks) > 1 else 0
    perm = torch.randperm(len(blocks))
    val, train = blocks[perm[:n_val]], blocks[perm[n_val:]]
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        batch = train[torch.randint(len(train), (batch_size,))].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("step %d/%d train loss %.4f (%.0fs)", step + 1, steps, loss.item(),
                        time.time() - start)
    model.eval()
    val_loss = heldout_loss(model, val, batch_size, device) if n_val else float("nan")
    logger.info("held-out loss %.4f (ppl %.2f) on %d blocks", val_loss,
                torch.tensor(val_loss).exp().item(), n_val)
    os.makedirs(out_dir, exist_ok=True)
    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metadata = {"stand_in_judge": True, "corpus": corpus_name, "documents": len(documents),
                "blocks": len(blocks), "context": context, "n_layer": n_layer,
                "n_embd": n_embd, "n_head": n_head, "steps": steps, "batch_size": batch_size,
                "lr": lr, "seed": seed, "final_train_loss": loss.item(),
                "heldout_loss": val_loss}
    with open(os.path.join(out_dir, "judge_metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(STAND_IN_README.format(corpus=corpus_name))
    return model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (save_pretrained)")
    p.add_argument("--text-file", default=None,
                   help="plain text, documents separated by blank lines (default: the "
                        "embedded corpus via data.embedded_corpus_documents)")
    p.add_argument("--tokenizer-file", default=DEFAULT_TOKENIZER_FILE,
                   help="tokenizers JSON file (default: assets/embedded_tokenizer.json)")
    p.add_argument("--bos-token", default=None)
    p.add_argument("--eos-token", default=None)
    p.add_argument("--pad-token", default=None)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--context", type=int, default=128, help="judge n_positions")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default %(default)s: about 6 min on 2 CPU cores; 0.32 s a "
                        "step single-threaded)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    if args.text_file:
        documents, corpus_name = load_text_documents(args.text_file), args.text_file
    else:
        sys.path.insert(0, REPO_ROOT)
        try:
            from data import embedded_corpus_documents
        except ImportError as error:
            raise SystemExit("data.embedded_corpus_documents is not available here; "
                             "pass --text-file <plain text>") from error
        documents, corpus_name = embedded_corpus_documents("train"), "the embedded corpus"
    tokenizer = load_tokenizer(args.tokenizer_file, args.bos_token, args.eos_token,
                               args.pad_token)
    train_judge(documents, tokenizer, args.out, n_layer=args.n_layer, n_embd=args.n_embd,
                n_head=args.n_head, context=args.context, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                corpus_name=corpus_name)
    logger.info("saved stand-in judge to %s", args.out)


if __name__ == "__main__":
    main()
