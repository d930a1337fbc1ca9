"""Dataset-specific detokenisers: undo a corpus's tokenised spacing before our tokenizer runs.

``lm1b`` follows the rule set of the paper's code (MDLM/DUO lineage) so that the same text
reaches the tokenizer; the rules, applied in this order, are:

1. ``"http : / / "`` / ``"https : / / "`` -> ``"http://"`` / ``"https://"``
2. a space before an apostrophe that starts a word is dropped (``"it 's"`` -> ``"it's"``); there
   is no rule for ``n't`` (``"do n't"`` stays)
3. ``" word . "`` -> ``" word. "`` and a final ``" word ."`` -> ``" word."`` (a word character
   must precede the period, so ``") ."`` stays)
4. ``" ? "``/``" ! "`` -> ``"? "``/``"! "``, and at the very end ``" ?"``/``" !"`` -> ``"?"``/``"!"``
5. ``" , "``, ``" : "``, ``" ; "`` -> ``", "``, ``": "``, ``"; "``
6. ``" / "`` -> ``"/"``
7. ``'" x "'`` -> ``'"x"'``, ``"' x '"`` -> ``"'x'"``, ``"( x )"`` -> ``"(x)"``,
   ``"[ x ]"`` -> ``"[x]"`` (innermost, non-empty contents)
8. ``"$ "`` -> ``"$"``, ``"£ "`` -> ``"£"`` (percent signs keep their space: ``"50 %"`` stays)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence


def _literal(old: str, new: str) -> tuple[re.Pattern[str], str]:
    return re.compile(re.escape(old)), new.replace("\\", "\\\\")


def _enclosed(left: str, right: str) -> tuple[re.Pattern[str], str]:
    """``left + " " + contents + " " + right`` -> ``left + contents + right``."""
    inner = f"[^{re.escape(left)}{re.escape(right)}]+"
    return re.compile(f"{re.escape(left)} ({inner}) {re.escape(right)}"), f"{left}\\1{right}"


_LM1B_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    _literal("http : / / ", "http://"),
    _literal("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "),
    (re.compile(r" (\w+) \.$"), r" \1."),
    _literal(" ? ", "? "),
    (re.compile(r" \?$"), "?"),
    _literal(" ! ", "! "),
    (re.compile(r" !$"), "!"),
    _literal(" , ", ", "),
    _literal(" : ", ": "),
    _literal(" ; ", "; "),
    _literal(" / ", "/"),
    _enclosed('"', '"'),
    _enclosed("'", "'"),
    _enclosed("(", ")"),
    _enclosed("[", "]"),
    _literal("$ ", "$"),
    _literal("£ ", "£"),
)


def _lm1b_detokenize(text: str) -> str:
    """Undo LM1B's tokenised spacing with the paper's rule set (module docstring)."""
    for pattern, replacement in _LM1B_RULES:
        text = pattern.sub(replacement, text)
    return text


DETOKENIZERS: dict[str, Callable[[str], str]] = {"lm1b": _lm1b_detokenize}


def detokenize(name: str | None, texts: Sequence[str]) -> list[str]:
    """Apply the dataset-specific detokeniser ``name`` (``None``: identity) to every text."""
    if name is None:
        return list(texts)
    if name not in DETOKENIZERS:
        raise ValueError(f"unknown data.detokenizer={name!r}; choose one of "
                         f"{sorted(DETOKENIZERS)} or null")
    fn = DETOKENIZERS[name]
    return [fn(t) for t in texts]
