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


class KVPool:
    """Cache memory for many generations at once, sized once: per layer one buffer of ``slots`` slots,
    carved into per-generation caches (:class:`PoolCache`, views: nothing is copied, ever) by first fit.
    A pool bounds what concurrent generations can hold, whatever they ask."""

    def __init__(self, num_layers: int, slots: int, dtype: torch.dtype) -> None:
        self.num_layers, self.slots, self.dtype = num_layers, slots, dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # made at a layer's first write
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.free: list[tuple[int, int]] = [(0, slots)]  # (start, length), sorted, coalesced

    def allocate(self, capacity: int) -> PoolCache | None:
        """A cache of ``capacity`` slots, or ``None`` while the pool has no such free stretch."""
        for i, (start, length) in enumerate(self.free):
            if length >= capacity:
                rest = (start + capacity, length - capacity)
                self.free[i : i + 1] = [rest] if rest[1] else []
                return PoolCache(self, start, capacity)
        return None

    def release(self, cache: PoolCache) -> None:
        """Give ``cache``'s slots back (once; later calls do nothing)."""
        if cache.released:
            return
        cache.released = True
        self.free.append((cache.offset, cache.capacity))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self.free = merged

    @property
    def used(self) -> int:
        return self.slots - sum(length for _, length in self.free)

    def layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """The pool's buffers for ``layer_idx``, made at its first write (shapes from the first keys)."""
        if self.keys[layer_idx] is None:
            b, h, _, d = key_states.shape
            dev = key_states.device
            self.keys[layer_idx] = torch.zeros(b, h, self.slots, d, dtype=self.dtype, device=dev)
            self.values[layer_idx] = torch.zeros(
                b, value_states.shape[1], self.slots, value_states.shape[-1], dtype=self.dtype, device=dev
            )
        return self.keys[layer_idx], self.values[layer_idx]


class PoolCache(KVCache):
    """A generation's cache: slots ``[offset, offset + capacity)`` of a :class:`KVPool`."""

    def __init__(self, pool: KVPool, offset: int, capacity: int) -> None:
        super().__init__(pool.num_layers, capacity, pool.dtype)
        self.pool, self.offset, self.released = pool, offset, False

    def _allocate(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys, values = self.pool.layer(layer_idx, key_states, value_states)
        span = slice(self.offset, self.offset + self.capacity)
        self.keys[layer_idx], self.values[layer_idx] = keys[:, :, span], values[:, :, span]
        return self.keys[layer_idx], self.values[layer_idx]


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
