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
        keys = self.keys[layer_idx]
        if keys is None:
            keys, values = self._allocate(layer_idx, key_states, value_states)
        else:
            values = self.values[layer_idx]
        n = key_states.shape[-2]
        start = self._write_start
        keys[:, :, start : start + n].copy_(key_states)
        values[:, :, start : start + n].copy_(value_states)
        return keys[:, :, : self._read_len], values[:, :, : self._read_len]

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
