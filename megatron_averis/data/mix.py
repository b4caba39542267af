"""The natural-language / code mix of the experiment corpus.

Documents carry a ``kind`` ('natural' or 'code') and a ``source`` (embedded,
stdlib, site-packages, natural/<package>, extra-...). Three things here:

- ``select_natural_fraction``: reach a target share F of natural-language
  tokens by dropping code documents, never by repeating anything. Every
  natural document is kept; code documents are kept in canonical (hash) order
  up to the budget ``natural_tokens * (1 - F) / F``, so the dropped ones are
  the tail of that order, the same on every machine with the same inputs. The
  document that crosses the budget is kept if that ends nearer to it than
  stopping before it, so the code tokens miss the budget by at most half of
  one document. Prose is never dropped, so a target below the corpus's own
  share keeps all code and the share stays above F.
- ``tokenizer_sample``: documents for tokenizer training, each (source, kind)
  group represented in proportion to its bytes (code scaled down to the
  target share when F is given), so small natural sources are not left to
  where their few documents fall in the hash order.
- ``mix_table``: documents, tokens and bytes per kind and per source.
"""

from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

KINDS = ("natural", "code")
TokenCounter = Callable[[Iterable], Iterator[int]]


def check_fraction(fraction: Optional[float]) -> None:
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"--natural-fraction {fraction}: must be in (0, 1], the target share "
                         "of natural-language tokens in each split, e.g. 0.5")


def select_natural_fraction(docs: Sequence, fraction: float,
                            count_tokens: TokenCounter) -> Tuple[List, dict]:
    """Keep all natural documents and a canonical-order prefix of the code ones;
    see the module docstring. ``count_tokens`` maps documents to token counts,
    lazily (it is closed once the budget is reached)."""
    natural = [d for d in docs if d.kind == "natural"]
    code = [d for d in docs if d.kind != "natural"]
    natural_tokens = sum(count_tokens(natural))
    budget = natural_tokens * (1.0 - fraction) / fraction
    kept, code_tokens = set(), 0
    counts = count_tokens(code)
    try:
        for doc in code:
            if code_tokens >= budget:
                break  # before counting the next one: the pool stops here
            n = next(counts)
            if code_tokens + n > budget and code_tokens + n - budget > budget - code_tokens:
                break  # stopping before it lands nearer the budget
            kept.add(doc.key)
            code_tokens += n
    finally:
        counts.close()
    selected = [d for d in docs if d.kind == "natural" or d.key in kept]
    return selected, {"natural_fraction": fraction, "natural_tokens": natural_tokens,
                      "code_token_budget": int(round(budget)), "code_tokens_kept": code_tokens,
                      "code_documents_kept": len(kept),
                      "code_documents_dropped": len(code) - len(kept)}


def tokenizer_sample(docs: Sequence, max_bytes: int,
                     natural_fraction: Optional[float] = None) -> List:
    """Documents (canonical order kept) whose groups' byte shares match the
    corpus's, about ``max_bytes`` in all."""
    sizes: Dict[Tuple[str, str], int] = defaultdict(int)
    for d in docs:
        sizes[(d.source, d.kind)] += d.nbytes
    natural = sum(v for (_, kind), v in sizes.items() if kind == "natural")
    code = sum(sizes.values()) - natural
    if natural_fraction is not None and natural and code:
        target_code = natural * (1.0 - natural_fraction) / natural_fraction
        scale = min(1.0, target_code / code)
        sizes = {g: (v if g[1] == "natural" else v * scale) for g, v in sizes.items()}
    total = sum(sizes.values())
    ratio = min(1.0, max_bytes / total) if total else 0.0
    quota = {g: v * ratio for g, v in sizes.items()}
    taken: Dict[Tuple[str, str], int] = defaultdict(int)
    picked = []
    for d in docs:
        g = (d.source, d.kind)
        if taken[g] < quota[g]:
            picked.append(d)
            taken[g] += d.nbytes
    return picked


def _row() -> dict:
    return {"documents": 0, "tokens": 0, "bytes": 0}


def mix_table(docs: Sequence, tokens: Sequence[int]) -> dict:
    """Documents, tokens and bytes per kind and per source (with its kinds)."""
    if len(docs) != len(tokens):
        raise ValueError(f"{len(docs)} documents but {len(tokens)} token counts")
    by_kind = {k: _row() for k in KINDS}
    by_source: Dict[str, Dict[str, dict]] = {}
    for d, n in zip(docs, tokens):
        for row in (by_kind[d.kind], by_source.setdefault(d.source, {}).setdefault(d.kind, _row())):
            row["documents"] += 1
            row["tokens"] += int(n)
            row["bytes"] += d.nbytes
    total = sum(r["tokens"] for r in by_kind.values())
    return {"by_kind": by_kind,
            "by_source": {s: dict(sorted(k.items())) for s, k in sorted(by_source.items())},
            "natural_token_share": round(by_kind["natural"]["tokens"] / total, 6) if total
            else 0.0}


def format_mix(split: str, mix: dict, target: Optional[float]) -> List[str]:
    share = mix["natural_token_share"]
    head = f"  mix ({split}): natural {share:.1%} of tokens"
    lines = [head + (f" (target {target:.1%})" if target is not None else ""),
             f"    {'kind':<8} {'source':<28} {'docs':>7} {'tokens':>13} {'bytes':>14}"]
    for source, kinds in mix["by_source"].items():
        for kind, r in kinds.items():
            lines.append(f"    {kind:<8} {source:<28} {r['documents']:>7,} {r['tokens']:>13,} "
                         f"{r['bytes']:>14,}")
    for kind, r in mix["by_kind"].items():
        lines.append(f"    {kind:<8} {'(all)':<28} {r['documents']:>7,} {r['tokens']:>13,} "
                     f"{r['bytes']:>14,}")
    return lines
