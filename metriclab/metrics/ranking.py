"""Exact per-row ranking on the CPU, compiled with numba: each key row's nearest columns in order, and
a query's ranking metrics from the classes of its ranked neighbours.

:mod:`metriclab.metrics.retrieval` computes key rows (smaller = nearer) chunk by chunk and calls these on
worker threads (the kernels release the GIL). Its CPU metrics use :func:`split_by_class` and
:func:`merged_sums` (end of this file), and :func:`nearest` and :func:`ranking_sums` for the rare rows whose
candidates overflow their buffers. Order is by key, then by column, exactly: MAP@R of a
60k gallery ranks the R ~ 6,000 nearest of each query, so this sort is most of an evaluation.

How a row is sorted: the keys up to a threshold (placed from a sorted sample of the row) are
compacted in column order, dealt into about one bucket per key by a linear map of the key between
the smallest and largest kept (monotone, so bucket order is key order), and each bucket is sorted
by insertion as int64 ``(key, column)`` codes (numpy's sort past 32 codes). Buckets after the one
that completes the row's ``need`` are never filled. A row of 60k keys with 6,000 needed takes
~150 us on a 2-core AMD EPYC, against ~300-400 us for numpy's sort of the same codes.

Compiled code is cached on disk (numba's ``cache=True``, beside this file or in numba's user cache):
the first call in a fresh environment compiles for ~6 s; later processes load it at their first
call (~0.3 s, mostly numba initialising itself).
"""

from __future__ import annotations

from collections.abc import Callable

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

INSERTION_MAX = 32  # larger buckets (many equal or crowded keys) are sorted by np.sort


def _compiled(func: Callable) -> Callable:
    """``func`` compiled by numba, releasing the GIL, cached on disk where numba finds a writable place."""
    try:
        return njit(nogil=True, cache=True)(func)
    except RuntimeError:  # numba found no writable cache directory: compile in each process instead
        return njit(nogil=True)(func)


@_compiled
def _code(key, column):
    """An int64 that sorts like ``(key, column)``: the float's bits made monotone, above the column."""
    bits = np.int64(np.float32(key + np.float32(0.0)).view(np.int32))  # + 0: -0.0 becomes +0.0, its equal
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return (bits << 32) | column


@_compiled
def codes(values, columns):
    """:func:`_code` of each ``(values[i, j], columns[i, j])``: sorting a row of these sorts it by key, then column."""
    out = np.empty(values.shape, np.int64)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = _code(values[i, j], columns[i, j])
    return out


_LANES = 16
# Compiled for the host CPU: with AVX-512, `vcompressps`-style stores keep a row's candidates 16 keys at a
# time (13 us for a 60k-key row on a Xeon, against 75-100 us for the scalar loop, which every CPU can run).
_AVX512 = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


@intrinsic
def _compress16(typingctx, row, start, threshold, out, m):
    """Store the columns ``start..start+15`` whose key is <= ``threshold`` at ``out[m:]``; returns the new ``m``."""
    if row.layout != "C" or out.layout != "C":
        return None  # the vector load and store need contiguous rows
    signature = types.int64(row, start, threshold, out, m)

    def codegen(context, builder, sig, args):
        row_v, start_v, threshold_v, out_v, m_v = args
        keys_ptr = context.make_array(sig.args[0])(context, builder, row_v).data
        out_ptr = context.make_array(sig.args[3])(context, builder, out_v).data
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vf, vi = ir.VectorType(f32, _LANES), ir.VectorType(i32, _LANES)
        zeros = ir.Constant(vi, [0] * _LANES)

        def splat(value: ir.Value, vector: ir.VectorType) -> ir.Value:
            one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(i32, 0))
            return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)

        keys = builder.load(builder.bitcast(builder.gep(keys_ptr, [start_v]), vf.as_pointer()), align=4)
        mask = builder.fcmp_ordered("<=", keys, splat(threshold_v, vf))
        columns = builder.add(splat(builder.trunc(start_v, i32), vi), ir.Constant(vi, list(range(_LANES))))
        store_type = ir.FunctionType(ir.VoidType(), [vi, i32.as_pointer(), mask.type])
        store = cgutils.get_or_insert_function(builder.module, store_type, f"llvm.masked.compressstore.v{_LANES}i32")
        builder.call(store, [columns, builder.gep(out_ptr, [m_v]), mask])
        bits = ir.IntType(_LANES)
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(bits, [bits]), f"llvm.ctpop.i{_LANES}"
        )
        count = builder.call(popcount, [builder.bitcast(mask, bits)])
        return builder.add(m_v, builder.zext(count, ir.IntType(64)))

    return signature, codegen


@_compiled
def _candidates(row, threshold, columns):
    """Writes the columns of ``row``'s keys <= ``threshold`` to ``columns`` in order; returns how many."""
    n = row.shape[0]
    m = 0
    done = 0
    if _AVX512:
        while done + _LANES <= n:
            m = _compress16(row, done, threshold, columns, m)
            done += _LANES
    for j in range(done, n):  # branch-free compaction: write always, advance when kept
        columns[m] = j
        m += row[j] <= threshold
    return m


@_compiled
def _kept(row, sample, rank, need, width, cc):
    """The columns of ``row``'s candidates in ``cc``, how many: every key up to a threshold from ``sample``.

    The threshold's rank in the sorted ``sample`` starts at ``rank`` and doubles while fewer than ``need``
    keys are under it (past the sample: +inf, every key); if then more than ``width`` are, it is bisected back
    between too few and too many. More than ``width`` are returned only where no rank in between fits.
    """
    top_rank = sample.shape[0] + 1  # stands for +inf
    unknown = top_rank + 1
    lo, hi = 0, unknown
    rk = min(rank, top_rank)
    while True:
        thr = sample[rk - 1] if rk < top_rank else np.float32(np.inf)
        m = _candidates(row, thr, cc)
        if m < need and rk < top_rank:
            lo = rk
        elif m > width and rk - lo > 1:
            hi = rk
        else:
            return m
        rk = (lo + hi + 1) // 2 if hi != unknown else min(2 * rk, top_rank)


@_compiled
def _sort_row(row, sample, rank, need, values, out, ck, cc, bucket, codes, ends):
    # 1. candidates: every key up to the threshold, raised until at least `need` are kept
    m = _kept(row, sample, rank, need, row.shape[0], cc)
    for i in range(m):
        ck[i] = row[cc[i]]
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for i in range(m):
        v = ck[i]
        if v < lo:
            lo = v
        if v > hi and v < np.inf:
            hi = v
    # 2. buckets: a monotone map of the key, so (bucket, key, column) order is (key, column) order
    nb = m
    scale = (nb - 1) / (hi - lo) if hi > lo else 0.0
    ends[: nb + 1] = 0
    for i in range(m):
        v = ck[i]
        b = nb - 1 if v >= hi else min(int((v - lo) * scale), nb - 1)
        bucket[i] = b
        ends[b + 1] += 1
    last = nb - 1  # the bucket that completes `need`: later ones are never filled
    total = 0
    for b in range(nb):
        total += ends[b + 1]
        ends[b + 1] = total
        if total >= need:
            last = b
            break
    for i in range(m):
        b = bucket[i]
        if b <= last:
            codes[ends[b]] = _code(ck[i], cc[i])
            ends[b] += 1
    # 3. each bucket sorted; codes are distinct, so this is the exact (key, column) order
    start = 0
    for b in range(last + 1):
        end = ends[b]
        if end - start > INSERTION_MAX:
            codes[start:end] = np.sort(codes[start:end])
        else:
            for x in range(start + 1, end):
                c = codes[x]
                y = x - 1
                while y >= start and codes[y] > c:
                    codes[y + 1] = codes[y]
                    y -= 1
                codes[y + 1] = c
        start = end
    for x in range(min(out.shape[0], start)):
        out[x] = values[codes[x] & 0xFFFFFFFF]


@_compiled
def nearest(keys, sample, rank, need, values, width):
    """``values`` of the columns of each row's ``need[row]`` smallest keys, by key then column: ``(rows, width)``.

    ``values`` maps a column to what is returned (``arange`` for the columns themselves, the
    gallery's class ids for the classes of the neighbours). ``sample`` holds sorted keys of each row
    (any columns); the row's threshold starts at ``sample[row, rank[row] - 1]`` (everything when
    ``rank`` exceeds the sample) and doubles its rank until ``need`` keys are under it. Entries
    past a row's ``need`` are ``values[0]``.
    """
    rows, n = keys.shape
    out = np.full((rows, width), values[0])
    ck = np.empty(n, np.float32)
    cc = np.empty(n, np.int32)
    bucket = np.empty(n, np.int64)
    codes = np.empty(n, np.int64)
    ends = np.empty(n + 1, np.int64)
    for r in range(rows):
        _sort_row(keys[r], sample[r], rank[r], need[r], values, out[r], ck, cc, bucket, codes, ends)
    return out


@_compiled
def _majority(ranked, vote_k):
    """The most frequent class among ``ranked[:vote_k]``; among equally frequent ones, the one ranked nearest."""
    best, best_score = 0, -1
    for j in range(vote_k):
        count = 0
        for i in range(vote_k):
            count += ranked[i] == ranked[j]
        score = count * (vote_k + 1) - j  # count first, then the nearest position
        if score > best_score:
            best, best_score = j, score
    return ranked[best]


@_compiled
def ranking_sums(neighbours, query_ids, relevant, top, vote_k):
    """Sums over queries with ``relevant > 0`` of precision@t and hit@t (each ``t`` in ``top``), AP@R and
    R-precision, then the number of queries whose ``vote_k`` nearest vote their own class.

    ``neighbours[row]`` are the classes of the row's ranked neighbours, at least
    ``max(top, vote_k, relevant[row])`` of them. The vote is a majority; among equally frequent
    classes the one ranked nearest wins.
    """
    k = top.shape[0]
    sums = np.zeros(2 * k + 3)
    for row in range(neighbours.shape[0]):
        ranked = neighbours[row]
        own = query_ids[row]
        sums[2 * k + 2] += _majority(ranked, vote_k) == own
        r = relevant[row]
        if r == 0:
            continue
        for t in range(k):
            hits = 0
            for i in range(top[t]):
                hits += ranked[i] == own
            sums[t] += hits / top[t]
            sums[k + t] += hits > 0
        hits = 0
        precision_sum = 0.0
        for i in range(r):  # branch-free: same-class neighbours are unpredictable
            same = ranked[i] == own
            hits += same
            precision_sum += same * hits / (i + 1)
        sums[2 * k] += precision_sum / r
        sums[2 * k + 1] += hits / r
    return sums


# -- ranking metrics without ranking every neighbour ----------------------------------------------------------
# A query's ranking metrics only ask, position by position, whether the neighbour is of the query's class, and
# the classes of its `vote_k` nearest. So the candidates are split into same-class and other-class keys, each
# list sorted by numpy (AVX-512 sorts float32 about 4x faster than int64 codes), and the two merged: equal keys
# of one list are interchangeable there, and equal keys of both lists are taken in column order. Rows with more
# candidates than the buffers hold are left to `nearest` and `ranking_sums`.


@_compiled
def split_by_class(keys, sample, rank, need, classes, own, same, other, columns, counts, voters, vote_k):
    """Per row: the candidate keys (as in :func:`nearest`) of ``own[row]``'s class into ``same[row]``, the others
    into ``other[row]``, the candidates' columns in order into ``columns[row]`` (``counts[row]`` = how many of
    each, then all candidates; +inf after each list's keys) and the classes of the row's ``vote_k`` nearest, by key
    then column, into ``voters[row]``. ``counts[row, 0] = -1`` marks a row whose candidates did not fit."""
    rows, n = keys.shape
    width = same.shape[1] - 1  # the last slot of each list stays +inf: a sentinel for the merge
    cc = np.empty(n, np.int32)
    best = np.empty(max(vote_k, 1), np.int64)  # the codes of the vote_k nearest so far, sorted
    for r in range(rows):
        row = keys[r]
        m = _kept(row, sample[r], rank[r], need[r], width, cc)
        if m > width:
            counts[r, 0] = -1
            continue
        mine = own[r]
        a = 0
        b = 0
        voted = 0
        worst = np.float32(np.inf)  # the key of the vote_k-th nearest so far: farther keys cannot vote
        for i in range(m):  # branch-free split: write to both lists, advance one
            c = cc[i]
            v = row[c]
            s = classes[c] == mine
            same[r, a] = v
            other[r, b] = v
            columns[r, i] = c
            a += s
            b += 1 - s
            if v <= worst and vote_k:
                code = _code(v, c)
                if voted < vote_k or code < best[vote_k - 1]:
                    y = min(voted, vote_k - 1)
                    while y > 0 and best[y - 1] > code:
                        best[y] = best[y - 1]
                        y -= 1
                    best[y] = code
                    voted = min(voted + 1, vote_k)
                    if voted == vote_k:
                        worst = row[best[vote_k - 1] & 0xFFFFFFFF]
        same[r, a:] = np.inf
        other[r, b:] = np.inf
        counts[r, 0] = a
        counts[r, 1] = b
        counts[r, 2] = m
        for j in range(vote_k):
            voters[r, j] = classes[best[j] & 0xFFFFFFFF]


@_compiled
def _take(is_same, a, b, i, hits, precision_sum, rr, prefix):
    """Ranked position ``i`` goes to the same-class list (``is_same``) or the other: the merge's counters after it."""
    hits += is_same
    prefix[i + 1] = hits
    if i < rr:
        precision_sum += is_same * hits / (i + 1)
    return a + is_same, b + 1 - is_same, i + 1, hits, precision_sum


@_compiled
def merged_sums(keys, classes, same, other, columns, counts, voters, own, relevant, top, sums, skipped):
    """:func:`ranking_sums` of rows split by :func:`split_by_class` (``same``/``other`` sorted), added to ``sums``.

    Where the heads of the two lists are equal, the column decides: that run of equal keys is taken
    from the row's candidates in column order. Rows with ``counts[row, 0] < 0`` are marked in ``skipped``.
    """
    k = top.shape[0]
    vote_k = voters.shape[1]
    prefix = np.zeros(max(relevant.max(), top.max()) + 1, np.int64)  # same-class neighbours among the first i
    for r in range(same.shape[0]):
        if counts[r, 0] < 0:
            skipped[r] = True
            continue
        mine = own[r]
        sums[2 * k + 2] += _majority(voters[r], vote_k) == mine
        rr = relevant[r]
        if rr == 0:
            continue
        na = counts[r, 0]
        nb = counts[r, 1]
        limit = max(rr, top.max())
        a = 0
        b = 0
        i = 0
        hits = 0
        precision_sum = 0.0
        while i < limit:
            x = same[r, a]
            y = other[r, b]
            if x == y and a < na and b < nb:  # equal keys of both classes: in column order
                for j in range(counts[r, 2]):
                    c = columns[r, j]
                    if keys[r, c] == x and i < limit:
                        a, b, i, hits, precision_sum = _take(
                            classes[c] == mine, a, b, i, hits, precision_sum, rr, prefix
                        )
                continue
            is_same = (x < y) | (b >= nb)  # branch-free; an exhausted list shows its +inf sentinel
            a, b, i, hits, precision_sum = _take(is_same, a, b, i, hits, precision_sum, rr, prefix)
        sums[2 * k] += precision_sum / rr
        sums[2 * k + 1] += prefix[rr] / rr
        for t in range(k):
            sums[t] += prefix[top[t]] / top[t]
            sums[k + t] += prefix[top[t]] > 0
    return sums
