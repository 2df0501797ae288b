"""The KV cache: per-layer key/value buffers allocated once and written by slot.

Slot ``s`` holds the token at position ``s``. Slots ``[0, length)`` hold verified tokens; anything beyond
is scratch that the next draft, verify or layer-selection call overwrites. Rolling back a rejected draft
is therefore ``cache.length = n``: nothing is copied, nothing is freed.

The class speaks the one method of Hugging Face's ``Cache`` that attention layers call, ``update``, so
the model's own attention modules read and write it. Before each call the runner says where the new
keys go and how many slots attention reads (:meth:`route`). Each layer's buffers are allocated on the
device of the keys it is first given, so a model whose layers sit on several devices keeps every
layer's cache next to the layer.
"""

from __future__ import annotations

import torch


class KVCache:
    """Pre-allocated per-layer K/V buffers of ``capacity`` slots, written by slot."""

    def __init__(self, num_layers: int, capacity: int, dtype: torch.dtype) -> None:
        self.num_layers = num_layers
        self.capacity = capacity
        self.dtype = dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0
        self._write_start = 0
        self._read_len = 0

    def route(self, write_start: int, num_new: int, read_len: int | None = None) -> None:
        """Route the next ``update`` calls: new keys go to ``[write_start, write_start + num_new)``;
        attention reads slots ``[0, read_len)`` (default: up to the last written slot)."""
        end = write_start + num_new
        if end > self.capacity:
            raise IndexError(f"KV cache overflow: slot {end - 1} asked of a cache with {self.capacity} slots")
        self._write_start = write_start
        self._read_len = end if read_len is None else read_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``[1, heads, n, dim]`` keys/values at the routed slots; return views of the readable part."""
        keys, values = self.write(layer_idx, key_states, value_states, self._write_start)
        return keys[:, :, : self._read_len], values[:, :, : self._read_len]

    def write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, start: int):
        """Write ``[1, heads, n, dim]`` keys/values of one layer at slots ``start ..``; return the buffers."""
        keys = self.keys[layer_idx]
        if keys is None:
            keys, values = self._allocate(layer_idx, key_states, value_states)
        else:
            values = self.values[layer_idx]
        n = key_states.shape[-2]
        if start + n > self.capacity:
            raise IndexError(f"KV cache overflow: slot {start + n - 1} asked of a cache with {self.capacity} slots")
        keys[:, :, start : start + n].copy_(key_states)
        values[:, :, start : start + n].copy_(value_states)
        return keys, values

    def _allocate(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        dev = key_states.device
        keys = torch.zeros(b, h, self.capacity, d, dtype=self.dtype, device=dev)
        values = torch.zeros(b, h, self.capacity, dv, dtype=self.dtype, device=dev)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def rollback(self, length: int) -> None:
        """Keep only slots ``[0, length)`` as verified; later slots become scratch."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"cannot set cache length to {length} (capacity {self.capacity})")
        self.length = length

    # Hugging Face attention code occasionally asks these; answer them truthfully.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def is_compileable(self) -> bool:
        return False


BLOCK = 16
"""Cache slots per block: the unit a pool counts and a growing cache takes."""


class PoolShort(Exception):
    """A pool has fewer free blocks than a cache asked for (the scheduler preempts or refuses)."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"the cache pool has {free} free slots; {needed} more were asked for")
        self.needed, self.free = needed, free


class KVPool:
    """Cache memory for many generations at once, bounded: ``slots`` cache slots counted in blocks of
    :data:`BLOCK`. A generation's cache (:class:`PoolCache`) takes blocks as its text grows, not what it
    might write, and gives them back when it ends; the pool bounds what all of them hold together,
    whatever they ask. (Each cache keeps its slots in buffers of its own, so nothing is ever fragmented,
    and growing copies a cache's slots once per doubling, never per round.)"""

    def __init__(self, num_layers: int, slots: int, dtype: torch.dtype) -> None:
        self.num_layers, self.dtype = num_layers, dtype
        self.blocks = max(1, -(-slots // BLOCK))
        self.taken = 0

    @property
    def slots(self) -> int:
        return self.blocks * BLOCK

    @property
    def used(self) -> int:
        """Slots held by caches."""
        return self.taken * BLOCK

    @property
    def free(self) -> int:
        return self.slots - self.used

    def take(self, blocks: int) -> bool:
        if blocks > self.blocks - self.taken:
            return False
        self.taken += blocks
        return True

    def give(self, blocks: int) -> None:
        self.taken -= blocks

    def allocate(self, first: int, limit: int) -> PoolCache | None:
        """A cache that holds ``first`` slots now and may grow to ``limit``; ``None`` while the pool has
        not the blocks for ``first``."""
        cache = PoolCache(self, 0, limit)
        try:
            cache.ensure(first)
        except PoolShort:
            return None
        return cache

    def release(self, cache: PoolCache) -> None:
        """Give ``cache``'s blocks back (once; later calls do nothing) and drop its buffers."""
        if cache.released:
            return
        cache.released = True
        self.give(cache.capacity // BLOCK)
        cache.keys = [None] * cache.num_layers
        cache.values = [None] * cache.num_layers
        cache.capacity = 0


class PoolCache(KVCache):
    """A generation's cache in a :class:`KVPool`: ``capacity`` slots now (whole blocks), growing on
    demand up to ``limit``. Growing takes blocks from the pool first and raises :class:`PoolShort` where
    the pool has none, before anything is written; then each layer's buffers are reallocated and the
    slots written so far copied over."""

    def __init__(self, pool: KVPool, capacity: int, limit: int) -> None:
        super().__init__(pool.num_layers, capacity, pool.dtype)
        self.pool, self.limit, self.released = pool, limit, False
        self.high = 0  # slots [0, high) may hold something (verified or scratch)

    @property
    def blocks(self) -> int:
        return self.capacity // BLOCK

    def ensure(self, end: int) -> None:
        """Make slots ``[0, end)`` writable: grow (doubling, to at most ``limit``) if needed."""
        if end <= self.capacity:
            return
        if self.released:
            raise RuntimeError("this cache was given back to its pool")
        if end > self.limit:
            raise IndexError(f"KV cache overflow: slot {end - 1} asked of a cache limited to {self.limit} slots")
        target = min(max(end, 2 * self.capacity), self.limit)
        for size in (target, end):
            size = min(-(-size // BLOCK) * BLOCK, -(-self.limit // BLOCK) * BLOCK)
            if self.pool.take(size // BLOCK - self.blocks):
                self._grow(size)
                return
        raise PoolShort(-(-end // BLOCK) * BLOCK - self.capacity, self.pool.free)

    def _grow(self, size: int) -> None:
        self._resize(size)

    def _resize(self, size: int) -> None:
        keep = min(self.high, size)
        for layer in range(self.num_layers):
            for bufs in (self.keys, self.values):
                old = bufs[layer]
                if old is None:
                    continue
                new = old.new_zeros(*old.shape[:2], size, old.shape[-1])
                new[:, :, :keep].copy_(old[:, :, :keep])
                bufs[layer] = new
        self.capacity, self.high = size, keep

    def shrink(self, slots: int) -> None:
        """Keep only slots ``[0, slots)`` (whole blocks), giving the rest back to the pool (a finished
        generation's cache, kept for prefix reuse)."""
        size = max(BLOCK, -(-slots // BLOCK) * BLOCK)
        if size >= self.capacity or self.released:
            return
        before = self.capacity
        self._resize(size)
        self.pool.give((before - size) // BLOCK)
        self.length = min(self.length, size)

    def route(self, write_start: int, num_new: int, read_len: int | None = None) -> None:
        self.ensure(write_start + num_new)
        super().route(write_start, num_new, read_len)

    def write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, start: int):
        end = start + key_states.shape[-2]
        self.ensure(end)
        self.high = max(self.high, end)
        return super().write(layer_idx, key_states, value_states, start)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.limit:
            raise ValueError(f"cannot set cache length to {length} (limit {self.limit})")
        self.length = length

    def copy_from(self, other: KVCache, length: int) -> None:
        """Slots ``[0, length)`` of ``other`` (a reused prefix) into this cache, which must hold them."""
        if getattr(other, "released", False) or length > other.length:
            raise ValueError("a prefix can only be copied from a live cache that holds it")
        self.ensure(length)
        for layer in range(self.num_layers):
            if other.keys[layer] is None:
                continue
            k, v = other.keys[layer][:, :, :length], other.values[layer][:, :, :length]
            self.write(layer, k, v, 0)
        self.length = length


class BatchCache:
    """Several generations' caches behind the one ``update`` a layer calls during a batched pass: each
    stretch of rows is written to its own generation's cache at its own slots. (Attention then reads
    each generation's cache itself: :class:`~.numerics.BatchRows`.)"""

    def __init__(self, segments: list[tuple[KVCache, int, int]]) -> None:
        self.segments = segments  # (cache, first slot, rows)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        at = 0
        for cache, start, rows in self.segments:
            cache.write(layer_idx, key_states[:, :, at : at + rows], value_states[:, :, at : at + rows], start)
            at += rows
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False
