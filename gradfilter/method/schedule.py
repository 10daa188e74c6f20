"""What the ensemble trains on and when: the data order of an epoch, the
batches of a norm pass, and the seeds that make both reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Salt of the data order of warm-up epochs (``member_schedule``'s epoch argument),
#: so that warm-up epochs never repeat the order of a scored epoch.
WARMUP_EPOCH_SALT = 1 << 20


def mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from (seed, salt), so streams of different purposes differ."""
    x = (seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def member_schedule(
    lengths: Sequence[int],
    batch_size: int,
    epoch: int,
    member_seeds: Sequence[int],
    data_seed: int,
    level_batches: int = 4,
) -> list[list[list[int]]]:
    """Training batches of one epoch: ``steps x members x row indices``.

    Rows are sorted by length and cut into levels of ``level_batches`` batches.
    The order of the levels is shared (``data_seed``), so at every step all
    members train on rows of similar length and the folded batch has little
    padding; within a level each member draws its own order (its seed), so the
    members see different data orders.  Every row is seen once per epoch by
    every member.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    size = batch_size * level_batches
    levels = [order[i : i + size] for i in range(0, n, size)]
    shared = torch.Generator().manual_seed(mix_seed(data_seed, 1000 + epoch))
    level_order = torch.randperm(len(levels), generator=shared).tolist()
    per_member = []
    for s in member_seeds:
        gen = torch.Generator().manual_seed(mix_seed(s, 2000 + epoch))
        steps = []
        for li in level_order:
            level = levels[li]
            perm = torch.randperm(len(level), generator=gen).tolist()
            shuffled = [level[j] for j in perm]
            steps += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
        per_member.append(steps)
    return [list(step) for step in zip(*per_member, strict=False)]


def snapshot_batches(
    lengths: list[int], batch_size: int, token_budget: int | None
) -> list[list[int]]:
    """Snapshot batches over rows sorted by length (little padding): at most
    ``batch_size`` rows and, with a token budget, at most ``token_budget`` padded
    tokens (per member)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in cur] + [lengths[i]])
        too_many = len(cur) >= batch_size or bool(
            token_budget and (len(cur) + 1) * longest > token_budget
        )
        if cur and too_many:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
