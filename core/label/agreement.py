"""Agreement between labellers, from their rankings."""

from __future__ import annotations

from typing import Any


def pairwise_agreement(ranked: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """``ranked``: labeller -> item -> ranks (0 = best, equal = tied). For every two
    labellers, over every pair of completions of the items both ranked: ``agreement`` is
    the share on which they say the same (better, worse or tied), ``strict`` the same
    direction among pairs both call strict; ``overall`` pools every two labellers' pairs."""
    names = sorted(ranked)
    pairs = []
    total_same = total_pairs = 0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(set(ranked[a]) & set(ranked[b]))
            same = strict_same = strict = count = 0
            for item in common:
                ra, rb = ranked[a][item], ranked[b][item]
                for x in range(len(ra)):
                    for y in range(x + 1, len(ra)):
                        sa, sb = _sign(ra[x] - ra[y]), _sign(rb[x] - rb[y])
                        count += 1
                        same += sa == sb
                        if sa and sb:
                            strict += 1
                            strict_same += sa == sb
            total_same, total_pairs = total_same + same, total_pairs + count
            pairs.append({"a": a, "b": b, "items": len(common), "pairs": count,
                          "agreement": same / count if count else None,
                          "strict": strict_same / strict if strict else None})
    return {"labellers": [{"name": n, "ranked": len(ranked[n])} for n in names], "pairs": pairs,
            "overall": total_same / total_pairs if total_pairs else None}


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)
