"""DecodeGraphs: the decode forward recorded once per batch size, replayed each step.

A decode step runs a dozen small kernels per layer over a few hundred tokens, so on a
GPU the host's launch time, not the GPU, bounds it. A CUDA graph records one forward's
launches and replays them with a single call. A graph replays fixed shapes at fixed
addresses, so:

- every input lives in one static device buffer that each step overwrites with a
  single non-blocking copy from a pinned host buffer; a CUDA event marks that copy's
  end, and the next step waits on it before it rewrites the host buffer;
- a batch of B decodes runs the graph of the smallest captured size >= B (1, 2, 4, 8,
  then every 16 up to max_num_seqs); the padding rows decode token 0 at position 0 and
  write their K/V into the cache's padding block, which no sequence reads;
- attention is the backend's decode twin, which keeps lengths on the device and reads
  block tables as wide as max_model_len needs.

Graphs are captured largest first into one shared memory pool (the platform's
graph_capture), after the KV cache is allocated. `capture` is injectable: CPU tests run
the same static-buffer path eagerly.
"""

import numpy as np
import torch

from ..model.gpt import GPT
from ..platform import platform_for
from ..platform.base import Capture
from ..arithmetic import cdiv
from .kv_cache import DecodeKVView, PagedKVCache

# the five per-token rows of the static input buffer, in order
INPUT_ROWS = ("input_ids", "positions", "prev_ids", "slot_mapping", "context_lens")


def capture_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: GPT, kv_cache: PagedKVCache, decode_attention: type, max_num_seqs: int,
                 max_model_len: int, device: torch.device, capture: Capture | None = None):
        n, bs = max_num_seqs, kv_cache.block_size
        table_width = cdiv(max_model_len, bs)
        platform = platform_for(device)
        self.batch_sizes = capture_batch_sizes(max_num_seqs)
        padding_slot = kv_cache.padding_block * bs
        # what a padding row holds: token 0 at position 0, alone in the padding block
        self.padding = dict(input_ids=0, positions=0, prev_ids=-1, slot_mapping=padding_slot,
                            context_lens=1, block_tables=kv_cache.padding_block)

        # one flat int64 buffer on each side, so a step is one copy
        flat_size = len(INPUT_ROWS) * n + n * table_width
        self.host = platform.host_buffer(flat_size)
        self.device_buffer = torch.empty(flat_size, dtype=torch.int64, device=device)
        # the step's copy runs while the host goes on; the host waits for it to finish
        # before rewriting the buffer it reads from (None on CPU: copies are done at once)
        self.copy_done = platform.copy_fence()
        self.host_arrays = self._split(self.host.numpy(), n, table_width)
        device_arrays = self._split(self.device_buffer, n, table_width)
        self._fill_padding(0, n)
        self.device_buffer.copy_(self.host)

        def forward(size: int):
            a = {name: array[:size] for name, array in device_arrays.items()}
            view = DecodeKVView(kv_cache, a["slot_mapping"], a["block_tables"], a["context_lens"])
            return model(a["input_ids"], a["positions"], a["prev_ids"], decode_attention(view))

        capture = capture or platform.graph_capture()
        try:
            with torch.inference_mode():
                self.replays = {size: capture(lambda size=size: forward(size))
                                for size in reversed(self.batch_sizes)}
        except RuntimeError as e:
            raise RuntimeError(f"capturing the decode CUDA graphs failed: {e}\n"
                               "enforce_eager=True runs every step without graphs") from e

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    @staticmethod
    def _split(flat, n: int, table_width: int) -> dict:
        rows = {name: flat[i * n:(i + 1) * n] for i, name in enumerate(INPUT_ROWS)}
        rows["block_tables"] = flat[len(INPUT_ROWS) * n:].reshape(n, table_width)
        return rows

    def _fill_padding(self, first_row: int, end_row: int) -> None:
        for name, value in self.padding.items():
            self.host_arrays[name][first_row:end_row] = value

    def run(self, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        """Hidden states [B, n_embd] of B <= max_num_seqs single-token steps.

        `inputs` holds the INPUT_ROWS as [B] arrays and block_tables as [B, w]. The
        result is a view of the graph's output: use it before the next run.
        """
        batch = len(inputs["input_ids"])
        size = next(s for s in self.batch_sizes if s >= batch)
        if self.copy_done is not None:
            self.copy_done.synchronize()
        host = self.host_arrays
        for name in INPUT_ROWS:
            host[name][:batch] = inputs[name]
        tables = inputs["block_tables"]
        host["block_tables"][:batch, :tables.shape[1]] = tables
        host["block_tables"][:batch, tables.shape[1]:] = self.padding["block_tables"]
        self._fill_padding(batch, size)
        self.device_buffer.copy_(self.host, non_blocking=True)
        if self.copy_done is not None:
            self.copy_done.record()
        return self.replays[size]()[:batch]
