"""Cutting one step's flat token batch into two micro-batches, for the ping-pong overlap.

With a remote expert backend, a layer's expert rows spend most of their time on
the wire and in the pools. Two micro-batches that alternate layer by layer keep
the engine busy meanwhile: while A's rows are in flight, B's attention, router
and shared expert run, and the other way round (MegaScale-Infer's ping-pong).

A cut is a row of the flat batch (decode rows first, then each prefill chunk):
rows before it are micro-batch A, rows from it on are B. Decode rows may be cut
anywhere; a prefill chunk is never cut, so each chunk's causal attention stays
within one micro-batch. Sequences are disjoint, so neither micro-batch reads K/V
the other writes.
"""

from __future__ import annotations

import dataclasses

from expertmesh.model.attention import ForwardBatch


def split_row(batch: ForwardBatch, num_tokens: int) -> int | None:
    """The allowed cut closest to an even split of the tokens (pure), or None if there is none.

    Allowed cuts: inside or right after the decode rows, and between prefill chunks.
    A step that is one prefill chunk alone cannot be cut.
    """
    cuts = set(range(1, batch.num_decode + 1)) | {span.end for span in batch.prefills}
    cuts = sorted(c for c in cuts if 0 < c < num_tokens)
    if not cuts:
        return None
    return min(cuts, key=lambda c: (abs(2 * c - num_tokens), c))


def plan_micro_batches(
    batch: ForwardBatch,
    num_tokens: int,
    micro_batches: int,
    min_tokens: int,
    concurrent_backend: bool,
) -> int | None:
    """Where to cut this step into two micro-batches (pure), or None to run it whole.

    Only worth it when the experts run elsewhere (a colocated backend computes in
    the same thread, so there is nothing to overlap) and the step is large enough
    that halving it does not just double the per-layer round trips.
    """
    if micro_batches < 2 or not concurrent_backend or num_tokens < min_tokens:
        return None
    return split_row(batch, num_tokens)


def split_forward_batch(batch: ForwardBatch, row: int) -> tuple[ForwardBatch, ForwardBatch]:
    """Rows [0, row) and [row, T) of `batch` as two self-contained ForwardBatches."""
    if any(span.start < row < span.end for span in batch.prefills):
        raise ValueError(f"row {row} cuts a prefill chunk; cut only between chunks")
    decode_cut = min(row, batch.num_decode)

    def part(rows: slice, decodes: slice, num_decode: int, spans) -> ForwardBatch:
        def sliced(t, s):
            return None if t is None else t[s]

        return ForwardBatch(
            positions=batch.positions[rows],
            slot_mapping=sliced(batch.slot_mapping, rows),
            num_decode=num_decode,
            decode_slots=sliced(batch.decode_slots, decodes) if num_decode else None,
            decode_lengths=sliced(batch.decode_lengths, decodes) if num_decode else None,
            prefills=spans,
        )

    first = part(
        slice(0, row),
        slice(0, decode_cut),
        decode_cut,
        [span for span in batch.prefills if span.end <= row],
    )
    second = part(
        slice(row, None),
        slice(decode_cut, None),
        batch.num_decode - decode_cut,
        [
            dataclasses.replace(span, start=span.start - row, end=span.end - row)
            for span in batch.prefills
            if span.start >= row
        ],
    )
    return first, second
