"""Ulysses context parallelism: the ranks of a group each hold a shard of the sequence for every
head outside attention, and the whole sequence for a slice of the heads inside it.

Plans are per head, so sparse attention composes with Ulysses: one all-to-all turns a rank's
sequence shard of every head into the whole sequence of its heads, the rank calibrates and runs
the plans of those heads, and a second all-to-all turns the output back. Rank ``r`` of ``P`` holds
heads ``r*H/P .. (r+1)*H/P - 1``, the same contiguous slice diffusers' Ulysses attention gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .layout import TokenLayout


@dataclass(frozen=True)
class UlyssesGroup:
    """The process group a layer's heads are split over.

    Args:
        group: the ranks of the Ulysses group, in head-slice order.
        rank: this process's position in ``group``.
        size: how many ranks ``group`` has.

    Example (on every rank of an initialised process group)::

        >>> ulysses = UlyssesGroup.of(dist.group.WORLD)  # doctest: +SKIP
        >>> ulysses.heads(8)  # doctest: +SKIP
        range(4, 8)
    """

    group: Any
    rank: int
    size: int
    _orders: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, group: Any) -> UlyssesGroup:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def heads(self, total: int) -> range:
        """The global indices of this rank's heads among ``total``."""
        if total % self.size:
            raise ValueError(f"{total} heads cannot be split evenly over {self.size} Ulysses ranks")
        count = total // self.size
        return range(self.rank * count, (self.rank + 1) * count)

    def to_heads(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``(B, S/P, H, D)`` sequence shard of every head -> ``(B, S, H/P, D)`` whole sequence of this
        rank's heads, in ``layout``'s token order."""
        batch, local, heads, dim = x.shape
        send = x.reshape(batch, local, self.size, heads // self.size, dim).permute(2, 0, 1, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        gathered = received.permute(1, 0, 2, 3, 4).reshape(batch, self.size * local, heads // self.size, dim)
        order = self._order(layout, x.device)
        return gathered if order is None else gathered.index_select(1, order[0])

    def to_sequence(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The inverse of :meth:`to_heads`: ``(B, S, H/P, D)`` -> ``(B, S/P, H, D)``."""
        order = self._order(layout, x.device)
        if order is not None:
            x = x.index_select(1, order[1])
        batch, seq, local_heads, dim = x.shape
        send = x.reshape(batch, self.size, seq // self.size, local_heads, dim).permute(1, 0, 2, 3, 4).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received.permute(1, 2, 0, 3, 4).reshape(batch, seq // self.size, self.size * local_heads, dim)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` (same shape on each) concatenated along ``dim``, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _order(self, layout: TokenLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where each token of ``layout`` sits in the sequence the all-to-all gathers, and the inverse.

        Every rank's shard holds its slice of the text and its slice of the video, so with text in
        the sequence (Flux) the gathered shards interleave text and video: ``None`` when they do not.
        """
        if not layout.text_len:
            return None
        key = (layout.geometry, device)
        if key not in self._orders:
            for part, length in (("text", layout.text_len), ("video", layout.video_len)):
                if length % self.size:
                    raise ValueError(
                        f"the {part} ({length} tokens) cannot be split evenly over {self.size} Ulysses ranks"
                    )
            text, video = layout.text_len // self.size, layout.video_len // self.size
            shard = torch.arange(self.size)[:, None] * (text + video)
            text_at = (shard + torch.arange(text) + (0 if layout.text_first else video)).reshape(-1)
            video_at = (shard + torch.arange(video) + (text if layout.text_first else 0)).reshape(-1)
            order = torch.cat([text_at, video_at] if layout.text_first else [video_at, text_at]).to(device)
            self._orders[key] = (order, TokenLayout.inverse(order))
        return self._orders[key]


def balanced_head_order(cost: torch.Tensor, ranks: int) -> torch.Tensor:
    """``[H]`` an order of the heads whose ``ranks`` consecutive equal slices carry loads as even as
    a greedy rule makes them: heaviest head first (``cost``, ``[H]``), each to the least loaded
    rank that has room; each slice sorted.

    Example::

        >>> balanced_head_order(torch.tensor([1.0, 1.0, 0.1, 0.1]), 2).tolist()
        [0, 2, 1, 3]
    """
    heads = cost.numel()
    room = heads // ranks
    loads, members = [0.0] * ranks, [[] for _ in range(ranks)]
    for head in sorted(range(heads), key=lambda h: -float(cost[h])):
        rank = min((r for r in range(ranks) if len(members[r]) < room), key=lambda r: loads[r])
        members[rank].append(head)
        loads[rank] += float(cost[head])
    return torch.tensor([head for member in members for head in sorted(member)])
