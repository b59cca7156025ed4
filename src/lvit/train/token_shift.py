"""Training reports read at other positions: empty positions inserted among a report's word pieces.

LViT's text path reads the ``L`` token positions as channels (each position has its own weights), so a network
trained on one report template learns where each fact sits as much as what the words say: reworded reports that
move the words cost far more than ones that change a word in place (docs/REPORT_OPTIONAL.md, "What rewording
costs, rule by rule"). ``text.token_shift: S`` moves the words without rewording them: in training, each report's
``n`` word pieces are spread over ``n + k`` positions, ``k`` drawn uniformly from ``0 .. min(S, L - n)``, the
``k`` empty positions (zero vectors, masked out: what padding already is) at random places among them. The words,
their order and hence the report's facts stay; only their positions change, and no word is cut off.

``text.token_shuffle: p`` goes one step further for the order: with probability ``p`` a training report's word
pieces are read in a random order, in the positions they occupy (before any shift). MiniLM's token vectors are
contextual, each carries what its neighbours say ("left" in "lower left lung"), so a text path that learns to
read them in any order can still tell the facts apart; one that reads them by position cannot. No word is
changed, added or removed: it is not a rewording rule.
"""

from __future__ import annotations

import torch


def shift_tokens(tokens: torch.Tensor, mask: torch.Tensor, max_shift: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [B, L, ...]`` (word-piece vectors, or ids) and ``mask [B, L]`` (True on a word piece) -> the same
    with up to ``max_shift`` empty positions inserted per report, within ``L``. Empty positions are zeros and
    False in the mask. Draws on ``generator`` (torch's default one if None), on the CPU, so that a seeded run
    draws the same shifts on every device."""
    if max_shift <= 0:
        return tokens, mask
    length = mask.shape[1]
    counts = mask.sum(dim=1).tolist()
    out, out_mask = torch.zeros_like(tokens), torch.zeros_like(mask)
    for b, n in enumerate(counts):
        room = min(max_shift, length - n)
        k = int(torch.randint(0, room + 1, (1,), generator=generator)) if room > 0 else 0
        # n of the n + k positions, in order, take the words; the other k stay empty
        places = torch.randperm(n + k, generator=generator)[:n].sort().values.to(tokens.device)
        out[b, places] = tokens[b][mask[b]]
        out_mask[b, places] = True
    return out, out_mask


def shuffle_tokens(tokens: torch.Tensor, mask: torch.Tensor, prob: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``tokens [B, L, ...]`` (word-piece vectors, or ids) and ``mask [B, L]`` (True on a word piece) -> the tokens
    with each report's word pieces, with probability ``prob``, in a random order among the positions they occupy
    (the mask is unchanged). Draws on ``generator`` (torch's default one if None), on the CPU."""
    if prob <= 0:
        return tokens
    out = tokens.clone()
    for b in range(mask.shape[0]):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        places = torch.nonzero(mask[b].cpu()).flatten()
        order = places[torch.randperm(len(places), generator=generator)]
        out[b, places.to(tokens.device)] = tokens[b, order.to(tokens.device)]
    return out
