"""The paper protocol's LM1B decoding: the text transformers 4.x (the paper's pin) returned.

A WordPiece (BERT-like) tokenizer is built here with the ``tokenizers`` library (no Hub), its
decoder the one bert-base-uncased's tokenizer.json names (WordPiece, "##", cleanup on). Each
case is a generated token sequence and the text 4.x's ``batch_decode`` produced for it,
written out by hand from 4.x's two steps: the tokenizers decoder (a space before every token
but the first and "##" pieces, then its cleanup of each spaced token on its own: " ." -> "."
and the like) and ``clean_up_tokenization`` on the whole text (its ten replacements in order). The same
token sequences through a ``BertTokenizerFast`` of transformers 4.49.0 with tokenizers 0.21.2
(the paper's requirements.txt) give these texts.
"""

from __future__ import annotations

import pytest
import torch

from evaluation.sample_eval import make_decode_fn

# (tokens the model generated, the text transformers 4.x decoded them to)
CASES = [
    ("[CLS] the duke ' s men . [SEP]", "[CLS] the duke's men. [SEP]"),
    ("[CLS] i don ' t know , he said [SEP]", "[CLS] i don't know, he said [SEP]"),
    ("[CLS] the u . s . army [SEP]", "[CLS] the u. s. army [SEP]"),
    ("[CLS] do n ' t go ! [SEP]", "[CLS] don't go! [SEP]"),  # " ' " first, then " n't"
    ("[CLS] why ? because [SEP]", "[CLS] why? because [SEP]"),
    ('[CLS] he said " hello " to me [SEP]', '[CLS] he said " hello " to me [SEP]'),
    ("[CLS] a well - known fact [SEP]", "[CLS] a well - known fact [SEP]"),
    ("[CLS] the king ( and queen ) left [SEP]", "[CLS] the king ( and queen ) left [SEP]"),
    ("[CLS] i ' m sure we ' re fine , they ' ve gone [SEP]",
     "[CLS] i'm sure we're fine, they've gone [SEP]"),
    ("[CLS] ' hello ' she said [SEP]", "[CLS]'hello'she said [SEP]"),  # both quotes glued
    ("[CLS] it ' ' s [SEP]", "[CLS] it'' s [SEP]"),  # replacements do not overlap
    ("[CLS] the duke ' ##s men [SEP]", "[CLS] the duke's men [SEP]"),  # " 's"
    ("[CLS] we ' ##ve and ' ##re and i ' ##m [SEP]", "[CLS] we've and're and i'm [SEP]"),
    ("[CLS] do n ' ##t [SEP]", "[CLS] do n 't [SEP]"),  # no rule joins "n 't"
    ("[CLS] 3 . 5 million [SEP]", "[CLS] 3. 5 million [SEP]"),
    ("[CLS] yes . [SEP] [CLS] no ? [SEP] [PAD] [PAD]", "[CLS] yes. [SEP] [CLS] no? [SEP] [PAD] [PAD]"),
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_like_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for tokens, _ in CASES for w in tokens.split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + words))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[CLS]", eos_token="[SEP]")


def ids_of(tokenizer, tokens: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in tokens.split()]


def test_paper_lm1b_decoding_is_transformers_4x():
    tokenizer = bert_like_tokenizer()
    width = max(len(tokens.split()) for tokens, _ in CASES)
    pad = tokenizer.pad_token_id
    rows = [ids_of(tokenizer, tokens) for tokens, _ in CASES]
    # one batch, [PAD]-filled to one width as samples are: the pads stay as text
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    texts = make_decode_fn(tokenizer, keep_special_text=True, wordpiece_cleanup=True)(ids)
    for (tokens, expected), row, text in zip(CASES, rows, texts):
        assert text == expected + " [PAD]" * (width - len(row)), tokens


def test_the_cleanup_is_ours_not_the_installed_transformers():
    """The tokenizers decoder alone (no transformers) leaves "duke ' s": the joining is the
    cleanup's, applied whatever transformers' own default is."""
    tokenizer = bert_like_tokenizer()
    tokens, expected = CASES[0]
    ids = ids_of(tokenizer, tokens)
    raw = tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False)
    assert raw == "[CLS] the duke ' s men. [SEP]" != expected
    tokenizer.clean_up_tokenization_spaces = True  # transformers' own switch: not read
    decode = make_decode_fn(tokenizer, keep_special_text=True, wordpiece_cleanup=True)
    assert decode(torch.tensor([ids])) == [expected]
    tokenizer.clean_up_tokenization_spaces = False
    assert decode(torch.tensor([ids])) == [expected]


@pytest.mark.parametrize("keep_special_text", [True, False])
def test_bpe_decoding_is_unchanged(keep_special_text):
    """OWT's GPT-2 (byte-level BPE) decoding is the tokenizer's own: no cleanup."""
    from data.tokenizers import get_tokenizer
    from tests.helpers import compose_config

    tokenizer = get_tokenizer(compose_config([]))  # data=embedded: a byte-level BPE
    ids = torch.tensor([tokenizer("the duke ' s men . do n't , u . s . ?")["input_ids"]])
    plain = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=not keep_special_text)
    texts = make_decode_fn(tokenizer, keep_special_text, wordpiece_cleanup=True)(ids)
    assert texts == plain and " ' s" in texts[0] and " ." in texts[0]
