"""Random plans for tests: every feature of the plan format switched on at random."""

from __future__ import annotations

import torch

from dit_sparse import BlockSparsePlan, TokenLayout

TILES = [(1, 4, 4), (2, 2, 4), (1, 3, 5), (2, 4, 8)]


def random_orders(layout: TokenLayout, heads: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, heads, S]``: a mix of identity, tile and fully random video orders, text last."""
    orders = []
    for _ in range(batch * heads):
        kind = int(torch.randint(3, (1,), generator=generator))
        if kind == 0:
            orders.append(layout.identity_order())
        elif kind == 1:
            orders.append(layout.tile_order(TILES[int(torch.randint(len(TILES), (1,), generator=generator))]))
        else:
            video = torch.randperm(layout.video_len, generator=generator) + layout.video_offset
            orders.append(torch.cat([video, layout.identity_order()[layout.video_len :]]))
    return torch.stack(orders).view(batch, heads, -1)


def random_starts(layout: TokenLayout, block: int, heads: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, heads, n + 1]`` variable block boundaries: blocks of 0 to ``block`` tokens at random
    (empty ones included), a few empty blocks appended, one block count for every head."""
    heads_starts = []
    for _ in range(batch * heads):
        lengths = []
        while sum(lengths) < layout.seq_len:
            lengths.append(min(int(torch.randint(block + 1, (1,), generator=generator)), layout.seq_len - sum(lengths)))
        heads_starts.append(torch.cumsum(torch.tensor([0] + lengths), 0))
    n = max(len(s) for s in heads_starts) + int(torch.randint(3, (1,), generator=generator))
    padded = [torch.nn.functional.pad(s, (0, n - len(s)), value=layout.seq_len) for s in heads_starts]
    return torch.stack(padded).view(batch, heads, n)


def random_plan(
    layout: TokenLayout,
    heads: int,
    block_size,
    batch: int = 1,
    density: float = 0.3,
    orders: bool = True,
    empty_rows: int = 0,
    seed: int = 0,
) -> BlockSparsePlan:
    g = torch.Generator().manual_seed(seed)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nk = layout.num_blocks(bq), layout.num_blocks(bk)
    mask = torch.rand(batch, heads, nq, nk, generator=g) < density
    for _ in range(empty_rows):
        b, h, i = (int(torch.randint(n, (1,), generator=g)) for n in (batch, heads, nq))
        mask[b, h, i] = False
    q_order = random_orders(layout, heads, batch, g) if orders else None
    kv_order = random_orders(layout, heads, batch, g) if orders else None
    return BlockSparsePlan.from_block_mask(mask, layout, block_size, q_order=q_order, kv_order=kv_order)
