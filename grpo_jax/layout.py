"""The update's layouts (``train.layout``), planned on the host from a batch's masks:

- ``padded``: the [B, S] rows as they are (prompt left-padded, completion right-padded);
- ``packed``: each row's real tokens as one segment, segments packed (first-fit decreasing) into rows of
  ``row_factor`` x S tokens: no compute on padding beyond the rows' tails;
- ``shared_prompt``: the rows of a group (consecutive ``group_size`` rows) that fall in the same block share their
  longest common prefix of real tokens (at least the prompt), encoded once; each row's remaining tokens are a
  branch after it that sees the prefix and itself (``grpo_jax.models.packed``). Padding is dropped as in ``packed``.

Both are exact: every real token sees the same keys at the same positions as in the padded rows. A micro-batch
(the train step's split: strided rows k, k+m, ... or contiguous ones) is cut into ``blocks`` blocks of consecutive
rows, one per batch shard, and each block is planned alone, so the gathers stay within a shard. Attention runs by
chunks of ``row_multiple`` tokens over the fewest static key chunks that cover every visible key (``chunk_window``).
Shapes are bucketed (L to a multiple of ``row_multiple``, R, N and the window by ``bucket``) so a run compiles few
variants.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from grpo_jax.mesh import shard_batch
from grpo_jax.models.packed import Plan
from grpo_jax.multihost import to_host

LayoutKind = Literal["padded", "packed", "shared_prompt"]


def bucket(n: int) -> int:
    """The smallest of 1, 2, 3, then m·2^k for m in 4..7 (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...) that is >= n: at
    most 25% over n, four shapes per doubling."""
    if n <= 4:
        return max(n, 1)
    k = 1 << (max(n - 1, 1).bit_length() - 3)
    return -(-n // k) * k


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One segment: its tokens, positions and branches, and its targets (source offset within the segment, target
    token, the padded slots (b, t) that read it)."""

    tokens: np.ndarray
    positions: np.ndarray
    branch: np.ndarray
    targets: list[tuple[int, int, list[tuple[int, int]]]]


def _segment(tokens_BxS, attn_BxS, want_BxS, rows: list[int]) -> _Segment | None:
    """The segment of rows that share their longest common prefix of real tokens (one row: the whole row)."""
    slots = [np.flatnonzero(attn_BxS[b]) for b in rows]
    real = [tokens_BxS[b, s] for b, s in zip(rows, slots)]
    keep = [i for i, r in enumerate(real) if len(r)]
    if not keep:
        return None
    rows, slots, real = [rows[i] for i in keep], [slots[i] for i in keep], [real[i] for i in keep]
    prefix = min(len(r) for r in real)
    for r in real[1:]:
        diff = np.flatnonzero(r[:prefix] != real[0][:prefix])
        prefix = int(diff[0]) if len(diff) else prefix
    parts_t, parts_p, parts_b = [real[0][:prefix]], [np.arange(prefix)], [np.zeros(prefix, np.int64)]
    starts, shared, targets = [], {}, []
    offset = prefix
    for i, r in enumerate(real):
        starts.append(offset)
        n = len(r) - prefix
        parts_t.append(r[prefix:]), parts_p.append(np.arange(prefix, len(r))), parts_b.append(np.full(n, i + 1))
        offset += n
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
    return _Segment(np.concatenate(parts_t), np.concatenate(parts_p), np.concatenate(parts_b), targets)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """How ``plan`` lays out a batch: ``kind`` (not ``padded``), the rows that may share a prefix (consecutive
    ``group_size`` rows), and the train step's micro-batch split (``micro_batches``, ``contiguous``) and shards
    (``blocks`` = the mesh's data x fsdp) that every plan follows."""

    kind: LayoutKind
    group_size: int = 1
    micro_batches: int = 1
    contiguous: bool = False
    blocks: int = 1
    row_multiple: int = 32  # L is a multiple of it; also the attention's chunk (query and key blocks)
    row_factor: int = 4  # packed: rows of row_factor x S tokens (several sequences each); shared_prompt: 1 group

    def __post_init__(self):
        if self.kind not in ("packed", "shared_prompt"):
            raise ValueError(f"Layout.kind must be 'packed' or 'shared_prompt' (padded needs no plan), got "
                             f"{self.kind!r}")
        if min(self.group_size, self.micro_batches, self.blocks, self.row_multiple, self.row_factor) < 1:
            raise ValueError(f"Layout: group_size, micro_batches, blocks, row_multiple and row_factor must be >= 1, "
                             f"got {self}")

    def block_rows(self, B: int) -> list[list[list[int]]]:
        """rows[k][d]: the padded rows of block d of micro-batch k, in the order the step sees them."""
        m, D = self.micro_batches, self.blocks
        if B % (m * D):
            raise ValueError(f"a batch of {B} rows does not split into micro_batches={m} x blocks={D}")
        micro = [list(range(k * B // m, (k + 1) * B // m)) if self.contiguous else list(range(k, B, m))
                 for k in range(m)]
        per = B // (m * D)
        return [[rows[d * per:(d + 1) * per] for d in range(D)] for rows in micro]

    def segments(self, tokens_BxS, attn_BxS, want_BxS, rows: list[int]) -> list[_Segment]:
        """A block's segments: each row alone (``packed``), or each run of rows of one group (``shared_prompt``)."""
        G = self.group_size if self.kind == "shared_prompt" else 1
        runs: list[list[int]] = []
        for b in rows:
            if runs and runs[-1][-1] // G == b // G:
                runs[-1].append(b)
            else:
                runs.append([b])
        return [s for run in runs if (s := _segment(tokens_BxS, attn_BxS, want_BxS, run)) is not None]

    def plan(self, tokens_BxS, attn_BxS, want_BxS) -> Plan:
        """The plan (numpy arrays) of a [B, S] batch: ``attn_BxS`` its real tokens, ``want_BxS`` the slots whose
        log-prob is needed (only those where the slot and its predecessor are real are taken)."""
        tokens_BxS, attn_BxS = np.asarray(tokens_BxS), np.asarray(attn_BxS).astype(bool)
        want_BxS = np.asarray(want_BxS).astype(bool)
        B, S = tokens_BxS.shape
        blocks = [[self.segments(tokens_BxS, attn_BxS, want_BxS, rows) for rows in micro]
                  for micro in self.block_rows(B)]
        longest = max([len(s.tokens) for micro in blocks for segs in micro for s in segs], default=1)
        L = max(longest, self.row_factor * S if self.kind == "packed" else 0)
        L = -(-L // self.row_multiple) * self.row_multiple
        places = [[_pack([len(s.tokens) for s in segs], L) for segs in micro] for micro in blocks]
        R = bucket(max([r + 1 for micro in places for p in micro for r, _ in p], default=1))
        N = bucket(max(sum(len(s.targets) for s in segs) for micro in blocks for segs in micro))
        return self._fill(blocks, places, (B, S, R, L, N))

    def _fill(self, blocks, places, shape) -> Plan:
        B, S, R, L, N = shape
        m, D = self.micro_batches, self.blocks
        rows = {k: np.zeros((m, D, R, L), np.int32) for k in ("tokens", "positions", "segment", "branch")}
        source, target = np.zeros((m, D, N), np.int32), np.zeros((m, D, N), np.int32)
        slot = np.full((B, S), N, np.int32)
        for k, d in np.ndindex(m, D):
            count, used = 0, np.zeros(R, np.int32)
            for seg, (r, off) in zip(blocks[k][d], places[k][d]):
                span = slice(off, off + len(seg.tokens))
                used[r] += 1
                for name, x in (("tokens", seg.tokens), ("positions", seg.positions), ("branch", seg.branch),
                                ("segment", used[r])):
                    rows[name][k, d, r, span] = x
                for src, tgt, slots in seg.targets:
                    source[k, d, count], target[k, d, count] = r * L + off + src, tgt
                    for b, t in slots:
                        slot[b, t] = count
                    count += 1

        def order(x):  # [m, D, ...] -> the leading axis the step's split turns back into [m, D, ...]
            x = x if self.contiguous else x.swapaxes(0, 1)
            return x.reshape((m * D,) + x.shape[2:])

        g, w = chunk_window(rows["segment"].reshape(-1, L), rows["branch"].reshape(-1, L), self.row_multiple)
        return Plan(tokens_XxRxL=order(rows["tokens"]), positions_XxRxL=order(rows["positions"]),
                    segment_XxRxL=order(rows["segment"]), branch_XxRxL=order(rows["branch"]),
                    source_XxN=order(source), target_XxN=order(target), slot_BxS=slot, chunk=self.row_multiple,
                    global_chunks=g, window_chunks=w)


def chunk_window(segment_RxL: np.ndarray, branch_RxL: np.ndarray, chunk: int) -> tuple[int, int]:
    """(g, w): the fewest key chunks g + w such that every key a query may see (the mask rule of
    ``grpo_jax.models.packed``) lies in its row's first g chunks or in the w chunks ending at the query's own chunk
    (chunks of ``chunk`` tokens; w bucketed). Packed sequences need g = 0 and w = ceil(longest / chunk) + 1; a row
    of one group's shared prompt needs g = the prompt's chunks and w = a completion's chunks + 1."""
    R, L = segment_RxL.shape
    J = L // chunk
    causal = np.tril(np.ones((L, L), bool))
    needed_RxJxJ = np.zeros((R, J, J), bool)
    for r in range(R):  # one row's L x L mask at a time
        s, b = segment_RxL[r], branch_RxL[r]
        allowed = (s[:, None] == s[None]) & (s[None] != 0) & ((b[None] == 0) | (b[None] == b[:, None])) & causal
        needed_RxJxJ[r] = allowed.reshape(J, chunk, J, chunk).any(axis=(1, 3))
    best = (J + 1, 0, J)
    for g in range(J + 1):
        beyond = np.pad(needed_RxJxJ[..., g:], ((0, 0), (0, 0), (0, 1)))  # needed chunks n >= g: w >= j - n + 1
        first = np.where(beyond.any(-1), np.argmax(beyond, axis=-1) + g, np.arange(J))
        w = bucket(int((np.arange(J) - first).max()) + 1)
        best = min(best, (g + w, g, w))
    return best[1], best[2]


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
