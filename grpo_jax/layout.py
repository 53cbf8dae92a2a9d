"""The update's layouts (``train.layout``), planned on the host from a batch's masks:

- ``padded``: the [B, S] rows as they are (prompt left-padded, completion right-padded);
- ``packed``: each row's real tokens as one segment, segments packed (first-fit decreasing) into rows of
  ``row_factor`` x S tokens, each query attending over the chunks an S-token sequence can touch;
- ``shared_prompt``: the rows of a group (consecutive ``group_size`` rows) that fall in the same block share their
  prompt (their real tokens before the completion column p), encoded once in the row's first ceil(p / chunk)
  chunks; each row's completion is a branch after it, at a fixed chunk-aligned slot, that sees the prompt and
  itself (``grpo_jax.models.packed``).

Both are exact: every real token sees the same keys at the same positions as in the padded rows. A micro-batch
(the train step's split: strided rows k, k+m, ... or contiguous ones) is cut into ``blocks`` blocks of consecutive
rows, one per batch shard, and each block is planned alone, so the gathers stay within a shard. Attention runs by
chunks of ``row_multiple`` tokens over a static window of key chunks that covers every visible key.

Every static shape of a plan (rows R, row length L, targets N, the chunk window g, w) is a function of the batch's
shape ([B, S], the completion column p, the group size, micro-batches and blocks), never of its data, so a run whose
batches keep one shape compiles the step and the reference pass once. The bounds are the worst case: ``packed``
has ceil(rows / row_factor) rows of row_factor x S tokens (first-fit never needs more), ``shared_prompt`` one row
per group run with a full completion slot per row. Only rows of one group with different prompts (ragged groups,
``rollout.dynamic_group``) can need more rows or targets than that; then R and N grow by ``bucket``.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from grpo_jax.mesh import shard_batch
from grpo_jax.models.packed import Plan
from grpo_jax.multihost import to_host

LayoutKind = Literal["padded", "packed", "shared_prompt"]
LayoutChoice = Literal["auto", "padded", "packed", "shared_prompt"]  # train.layout
ROW_MULTIPLE = 32  # Layout.row_multiple's default: the attention's chunk
SHARED_PROMPT_MIN_GAIN = 1.3  # measured gains 0.44 (arith_tiny), 1.06 (step_vs_trl standard), 1.45 (its long shape)


def auto_layout(group_size: int, prompt_tokens: float, new_tokens: int, chunk: int = ROW_MULTIPLE) -> LayoutKind:
    """``train.layout: auto``: shared_prompt when a group's token slots, G·(P + T) in padded rows against
    ceil(P/c)·c + G·ceil(T/c)·c in one shared-prompt row (its prompt and each completion start on a chunk of c =
    ``Layout.row_multiple``), shrink by ``SHARED_PROMPT_MIN_GAIN`` or more (P the prompt's tokens, T the completion's);
    else padded. Both are exact (the same log-probs and gradients): the choice changes speed only. shared_prompt's
    update was 2.1x and 1.25x slower than padded at the first two gains above, 1.4x faster at the third."""
    padded = group_size * (prompt_tokens + new_tokens)
    shared = -(-int(prompt_tokens) // chunk) * chunk + group_size * -(-new_tokens // chunk) * chunk
    return "shared_prompt" if group_size > 1 and padded >= SHARED_PROMPT_MIN_GAIN * shared else "padded"


def bucket(n: int) -> int:
    """The smallest of 1, 2, 3, then m·2^k for m in 4..7 (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...) that is >= n: at
    most 25% over n, four shapes per doubling."""
    if n <= 4:
        return max(n, 1)
    k = 1 << (max(n - 1, 1).bit_length() - 3)
    return -(-n // k) * k


def _at_least(bound: int, needed: int) -> int:
    """The static ``bound``, or ``bucket(needed)`` when the data exceeds it."""
    return bound if needed <= bound else bucket(needed)


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One segment: its tokens, positions and branches and the column of each within its row (from 0), and its
    targets (source column within the segment, target token, the padded slots (b, t) that read it)."""

    cols: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray
    branch: np.ndarray
    targets: list[tuple[int, int, list[tuple[int, int]]]]

    @property
    def span(self) -> int:
        return int(self.cols.max()) + 1 if len(self.cols) else 0


def _segment(tokens_BxS, attn_BxS, want_BxS, rows: list[int], p: int, base: int, stride: int) -> _Segment:
    """The segment of ``rows`` (each with a real token; their real tokens before column p are the same): those
    tokens once at columns 0, 1, ..., then row i's real tokens from column p on as branch i + 1 at columns
    base + i·stride, ... (one row and p = S: the whole row)."""
    slots = [np.flatnonzero(attn_BxS[b]) for b in rows]
    real = [tokens_BxS[b, s] for b, s in zip(rows, slots)]
    prefix = int((slots[0] < p).sum())
    cols, parts_t, parts_p = [np.arange(prefix)], [real[0][:prefix]], [np.arange(prefix)]
    parts_b, starts, shared, targets = [np.zeros(prefix, np.int64)], [], {}, []
    for i, r in enumerate(real):
        n = len(r) - prefix
        starts.append(base + i * stride)
        cols.append(starts[-1] + np.arange(n)), parts_t.append(r[prefix:])
        parts_p.append(np.arange(prefix, len(r))), parts_b.append(np.full(n, i + 1))
    for i, (b, s, r) in enumerate(zip(rows, slots, real)):
        wanted = np.flatnonzero(want_BxS[b, s[1:]] & (np.diff(s) == 1)) + 1  # real index j: slot s[j], s[j]-1 real
        for j in wanted.tolist():
            src = j - 1 if j - 1 < prefix else starts[i] + j - 1 - prefix
            if j < prefix:  # a target inside the shared prefix: one entry for every row
                if j not in shared:
                    shared[j] = len(targets)
                    targets.append((src, int(r[j]), []))
                targets[shared[j]][2].append((b, int(s[j])))
            else:
                targets.append((src, int(r[j]), [(b, int(s[j]))]))
    return _Segment(*(np.concatenate(x) for x in (cols, parts_t, parts_p, parts_b)), targets)


def _pack(lengths: list[int], L: int) -> list[tuple[int, int]]:
    """First-fit decreasing: (row, offset) of each segment in rows of L tokens."""
    free: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, f in enumerate(free) if f >= lengths[i]), len(free))
        if row == len(free):
            free.append(L)
        place[i] = (row, L - free[row])
        free[row] -= lengths[i]
    return place


def _runs(rows: list[int], key) -> list[list[int]]:
    """Maximal runs of consecutive ``rows`` with the same ``key(row)``."""
    runs: list[list[int]] = []
    for b in rows:
        if runs and key(runs[-1][-1]) == key(b):
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def _prompt_key(tokens_BxS, attn_BxS, p: int):
    """A row's real tokens before column p, as a key (rows of a fixed group all have the same one)."""
    return lambda b: (attn_BxS[b, :p].tobytes(), np.where(attn_BxS[b, :p], tokens_BxS[b, :p], 0).tobytes())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """How ``plan`` lays out a batch: ``kind`` (not ``padded``), the rows that may share a prompt (consecutive
    ``group_size`` rows), the train step's micro-batch split (``micro_batches``, ``contiguous``) and shards
    (``blocks`` = the mesh's data x fsdp) that every plan follows, and where completions start: the last
    ``new_tokens`` columns (``rollout.max_new_tokens``; what the reference pass, whose every real slot is wanted,
    needs), or without it the first column where any row's ``want`` is set (the train step's loss mask)."""

    kind: LayoutKind
    group_size: int = 1
    micro_batches: int = 1
    contiguous: bool = False
    blocks: int = 1
    row_multiple: int = ROW_MULTIPLE  # the attention's chunk (query, key blocks); L and shared_prompt's slots align
    row_factor: int = 4  # packed: rows of row_factor x S tokens (several sequences each)
    new_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in ("packed", "shared_prompt"):
            raise ValueError(f"Layout.kind must be 'packed' or 'shared_prompt' (padded needs no plan), got "
                             f"{self.kind!r}")
        if min(self.group_size, self.micro_batches, self.blocks, self.row_multiple, self.row_factor) < 1:
            raise ValueError(f"Layout: group_size, micro_batches, blocks, row_multiple and row_factor must be >= 1, "
                             f"got {self}")
        if self.new_tokens is not None and self.new_tokens < 1:
            raise ValueError(f"Layout.new_tokens must be None or >= 1, got {self.new_tokens}")

    def block_rows(self, B: int) -> list[list[list[int]]]:
        """rows[k][d]: the padded rows of block d of micro-batch k, in the order the step sees them."""
        m, D = self.micro_batches, self.blocks
        if B % (m * D):
            raise ValueError(f"a batch of {B} rows does not split into micro_batches={m} x blocks={D}")
        micro = [list(range(k * B // m, (k + 1) * B // m)) if self.contiguous else list(range(k, B, m))
                 for k in range(m)]
        per = B // (m * D)
        return [[rows[d * per:(d + 1) * per] for d in range(D)] for rows in micro]

    def completion_column(self, want_BxS: np.ndarray) -> int:
        """p: the column where completions start (S - ``new_tokens``, else the first column with a wanted slot)."""
        S = want_BxS.shape[1]
        if self.new_tokens is not None:
            if self.new_tokens > S:
                raise ValueError(f"Layout.new_tokens={self.new_tokens} is more than the batch's {S} columns")
            return S - self.new_tokens
        cols = np.flatnonzero(want_BxS.any(axis=0))
        return int(cols[0]) if len(cols) else S

    def plan(self, tokens_BxS, attn_BxS, want_BxS) -> Plan:
        """The plan (numpy arrays) of a [B, S] batch: ``attn_BxS`` its real tokens, ``want_BxS`` the slots whose
        log-prob is needed (only those where the slot and its predecessor are real are taken)."""
        tokens_BxS, attn_BxS = np.asarray(tokens_BxS), np.asarray(attn_BxS).astype(bool)
        want_BxS = np.asarray(want_BxS).astype(bool)
        p = self.completion_column(want_BxS)
        plan = self._packed if self.kind == "packed" else self._shared_prompt
        return plan(tokens_BxS, attn_BxS, want_BxS, p)

    def _packed(self, tokens_BxS, attn_BxS, want_BxS, p: int) -> Plan:
        """Rows of L = row_factor·S tokens (rounded up to a chunk), R = ceil(rows / row_factor) of them per block (a
        row with fewer than row_factor sequences of <= S tokens has S free, so first-fit opens no row before each
        holds row_factor), N = rows x the columns that can hold a target; g = 0 and w = the most chunks a sequence of
        S tokens can touch."""
        B, S = tokens_BxS.shape
        C, f = self.row_multiple, self.row_factor
        L = -(-f * S // C) * C
        blocks = [[[_segment(tokens_BxS, attn_BxS, want_BxS, [b], S, 0, 0) for b in rows if attn_BxS[b].any()]
                   for rows in micro] for micro in self.block_rows(B)]
        places = [[_pack([s.span for s in segs], L) for segs in micro] for micro in blocks]
        per = B // (self.micro_batches * self.blocks)
        first = 1 if want_BxS[:, :p].any() else max(p, 1)  # the first column that can hold a target
        R = _at_least(-(-per // f), max([r + 1 for micro in places for pl in micro for r, _ in pl], default=1))
        N = _at_least(per * (S - first), max(sum(len(s.targets) for s in segs) for micro in blocks for segs in micro))
        return self._fill(blocks, places, (B, S, R, L, N), (0, min(L // C, (S + C - 2) // C + 1)))

    def _shared_prompt(self, tokens_BxS, attn_BxS, want_BxS, p: int) -> Plan:
        """One row per run of a group's rows in a block: the prompt (columns < p) in its first g = ceil(p / C)
        chunks, row i's completion (columns >= p, T = S - p) at g·C + i·round_up(T, C): L = g·C + (longest run)·
        round_up(T, C), and a query sees the g prompt chunks and the w = round_up(T, C) / C chunks of its slot."""
        B, S = tokens_BxS.shape
        C, G = self.row_multiple, self.group_size
        g, stride = -(-p // C), -(-(S - p) // C) * C
        runs = [[_runs(rows, lambda b: b // G) for rows in micro] for micro in self.block_rows(B)]  # one group each
        same = _prompt_key(tokens_BxS, attn_BxS, p)  # a run of one group's rows is cut where the prompt differs
        L = g * C + stride * max(len(run) for micro in runs for block in micro for run in block)
        blocks = [[[_segment(tokens_BxS, attn_BxS, want_BxS, rows, p, g * C, stride) for run in block
                    for rows in _runs([b for b in run if attn_BxS[b].any()], same)]
                   for block in micro] for micro in runs]
        places = [[[(r, 0) for r in range(len(segs))] for segs in micro] for micro in blocks]
        prompt_targets = max(p - 1, 0) if want_BxS[:, :p].any() else 0  # once per run
        R = _at_least(max(len(block) for micro in runs for block in micro),
                      max(len(segs) for micro in blocks for segs in micro))
        N = _at_least(max(len(block) * prompt_targets + sum(map(len, block)) * (S - p) for micro in runs
                          for block in micro),
                      max(sum(len(s.targets) for s in segs) for micro in blocks for segs in micro))
        return self._fill(blocks, places, (B, S, R, L, N), (g, max(stride // C, 1)))

    def _fill(self, blocks, places, shape, window) -> Plan:
        B, S, R, L, N = shape
        m, D = self.micro_batches, self.blocks
        rows = {k: np.zeros((m, D, R, L), np.int32) for k in ("tokens", "positions", "segment", "branch")}
        source, target = np.zeros((m, D, N), np.int32), np.zeros((m, D, N), np.int32)
        slot = np.full((B, S), N, np.int32)
        for k, d in np.ndindex(m, D):
            count, used = 0, np.zeros(R, np.int32)
            for seg, (r, off) in zip(blocks[k][d], places[k][d]):
                used[r] += 1
                for name, x in (("tokens", seg.tokens), ("positions", seg.positions), ("branch", seg.branch),
                                ("segment", used[r])):
                    rows[name][k, d, r, off + seg.cols] = x
                for src, tgt, slots in seg.targets:
                    source[k, d, count], target[k, d, count] = r * L + off + src, tgt
                    for b, t in slots:
                        slot[b, t] = count
                    count += 1

        def order(x):  # [m, D, ...] -> the leading axis the step's split turns back into [m, D, ...]
            x = x if self.contiguous else x.swapaxes(0, 1)
            return x.reshape((m * D,) + x.shape[2:])

        return Plan(tokens_XxRxL=order(rows["tokens"]), positions_XxRxL=order(rows["positions"]),
                    segment_XxRxL=order(rows["segment"]), branch_XxRxL=order(rows["branch"]),
                    source_XxN=order(source), target_XxN=order(target), slot_BxS=slot, chunk=self.row_multiple,
                    global_chunks=window[0], window_chunks=window[1])


def place(plan: Plan, mesh) -> Plan:
    """The plan on the devices: every array's leading axis over the batch shards (numpy as is without a mesh)."""
    return plan if mesh is None else shard_batch(plan, mesh)


def with_plan(batch, layout: Layout, mesh=None):
    """The train ``Batch`` with its plan: the loss-mask slots' log-probs (the only ones the objectives read)."""
    plan = layout.plan(to_host(batch.tokens_BxS), to_host(batch.attn_mask_BxS), to_host(batch.loss_mask_BxS))
    return batch.replace(plan=place(plan, mesh))


class Planned:
    """A jitted ``fn`` whose arguments are planned on the host first (``plan_args``); ``lower`` likewise, so
    ``tracking.compiled_stats`` sees the compiled function of the layout."""

    def __init__(self, fn, plan_args):
        self.fn, self.plan_args = fn, plan_args

    def __call__(self, *args):
        return self.fn(*self.plan_args(*args))

    def lower(self, *args):
        return self.fn.lower(*self.plan_args(*args))


def planned_step(train_step, layout: Layout, mesh=None) -> Planned:
    """``train_step(state, batch)`` of a packed layout: the batch gets its plan, then the jitted step runs."""
    return Planned(train_step, lambda state, batch: (state, with_plan(batch, layout, mesh)))


def planned_logprobs(fn, layout: Layout, mesh=None) -> Planned:
    """``fn(params, tokens_BxS, mask_BxS, plan)`` as ``(params, tokens_BxS, mask_BxS) -> logps_BxS`` with every
    real slot's log-prob (the reference pass: equal to the padded computation everywhere)."""

    def plan_args(params, tokens_BxS, mask_BxS):
        mask = to_host(mask_BxS)
        return params, tokens_BxS, mask_BxS, place(layout.plan(to_host(tokens_BxS), mask, mask), mesh)

    return Planned(fn, plan_args)
