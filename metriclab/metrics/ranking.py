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
def _rank_threshold(sample, rk):
    """The key at rank ``rk`` (1-based) of the sorted ``sample``; past the sample, +inf (every key)."""
    return sample[rk - 1] if rk <= sample.shape[0] else np.float32(np.inf)


@_compiled
def _search_step(m, need, width, rk, lo, hi, top_rank):
    """The threshold search after ``m`` keys were found under rank ``rk``: ``(next rank, lo, hi)``, rank 0 to stop.

    The rank doubles while fewer than ``need`` keys are under it (``top_rank``: +inf, every key); if then more
    than ``width`` are, it is bisected back between too few (``lo``) and too many (``hi``). More than ``width``
    are kept only where no rank in between fits.
    """
    if m < need and rk < top_rank:
        lo = rk
    elif m > width and rk - lo > 1:
        hi = rk
    else:
        return 0, lo, hi
    return ((lo + hi + 1) // 2 if hi <= top_rank else min(2 * rk, top_rank)), lo, hi


@_compiled
def _kept(row, sample, rank, need, width, cc):
    """The columns of ``row``'s candidates in ``cc``, how many: every key up to a threshold from ``sample``.

    The threshold's rank in the sorted ``sample`` starts at ``rank`` (see :func:`_search_step`).
    """
    top_rank = sample.shape[0] + 1
    rk, lo, hi = min(rank, top_rank), 0, top_rank + 1
    while True:
        m = _candidates(row, _rank_threshold(sample, rk), cc)
        rk, lo, hi = _search_step(m, need, width, rk, lo, hi, top_rank)
        if rk == 0:
            return m


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


# -- ranking metrics from one sorted row of codes -------------------------------------------------------------
# A query's ranking metrics only ask, position by position, whether the neighbour is of the query's class, and
# the classes of its `vote_k` nearest. So each candidate becomes one float64 that sorts like (key, column) and
# carries that answer in its last bit (:func:`_sortable`); numpy sorts rows of these (with AVX-512 where the CPU
# has it, ~2x faster than int64 codes of the same order) and one pass over each sorted row sums the metrics.
# Rows with more candidates than the buffers hold are left to `nearest` and `ranking_sums`.

COLUMN_LIMIT = 1 << 28  # columns that fit a code: a float32 widened to float64 leaves 29 mantissa bits zero
_SIGN = np.int64(-(1 << 63))
_SMALLEST_NORMAL = np.int64(1 << 52)
_LARGEST_EXPONENT = np.int64(0x7FE << 52)
_INFINITE = np.int64(0x7FF << 52)  # the bits of +inf, exponent all ones
INF_CODE = np.float64(np.inf)  # after a row's codes: sorts last


@_compiled
def _sortable(key, column, same):
    """The int64 bits of a float64 that sorts like ``(key, column)`` and whose last bit is ``same``.

    ``key``'s float64 gets ``column`` in the mantissa bits a float32 leaves zero (reversed under a
    negative key, whose bits grow away from zero), then ``same``. A zero key takes the smallest
    normal float64 and an infinite one the largest exponent, so no code is subnormal or NaN.
    """
    bits = np.float64(key + np.float32(0.0)).view(np.int64)  # + 0: -0.0 becomes +0.0, its equal
    if bits == 0:
        bits = _SMALLEST_NORMAL
    elif (bits & _INFINITE) == _INFINITE:
        bits = (bits & _SIGN) | _LARGEST_EXPONENT
    low = column if bits >= 0 else COLUMN_LIMIT - 1 - column
    return bits | (np.int64(low) << 1) | same


@_compiled
def _column(code):
    """The column that :func:`_sortable` put in ``code``."""
    low = (code >> 1) & (COLUMN_LIMIT - 1)
    return low if code >= 0 else COLUMN_LIMIT - 1 - low


def _splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    """``value`` in every lane of a ``vector``."""
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)


def _compress(builder: ir.IRBuilder, vector: ir.Value, mask: ir.Value, ptr: ir.Value, m: ir.Value) -> None:
    """Store ``vector``'s lanes under ``mask`` at ``ptr[m:]``, packed, then garbage up to a whole vector.

    The lanes are packed in a register and stored whole: a compressing store to memory is slow on Intel cores.
    """
    kind = vector.type
    name = f"llvm.experimental.vector.compress.v{kind.count}{'f' if kind.element == ir.FloatType() else 'i'}32"
    compress = cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind, mask.type, kind]), name)
    packed = builder.call(compress, [vector, mask, ir.Constant(kind, ir.Undefined)])
    builder.store(packed, builder.bitcast(builder.gep(ptr, [m]), kind.as_pointer()), align=4)


@intrinsic
def _keep16(typingctx, row, classes, start, threshold, mine, ck, cs, m):
    """Of the columns ``start..start+15`` whose key is <= ``threshold``: the keys into ``ck[m:]`` and
    ``column << 1 | (class == mine)`` into ``cs[m:]``; returns the new ``m``. Both are written 16 entries on."""
    arrays = (row, classes, ck, cs)
    if any(a.layout != "C" for a in arrays) or classes.dtype != types.int32 or mine != types.int32:
        return None  # contiguous rows for the vector loads and stores, int32 classes
    signature = types.int64(row, classes, start, threshold, mine, ck, cs, m)

    def codegen(context, builder, sig, args):
        row_v, classes_v, start_v, threshold_v, mine_v, ck_v, cs_v, m_v = args
        keys_ptr, classes_ptr, ck_ptr, cs_ptr = (
            context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 1, 5, 6)
        )
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vf, vi = ir.VectorType(f32, _LANES), ir.VectorType(i32, _LANES)
        keys = builder.load(builder.bitcast(builder.gep(keys_ptr, [start_v]), vf.as_pointer()), align=4)
        mask = builder.fcmp_ordered("<=", keys, _splat(builder, threshold_v, vf))
        cls = builder.load(builder.bitcast(builder.gep(classes_ptr, [start_v]), vi.as_pointer()), align=4)
        same = builder.zext(builder.icmp_signed("==", cls, _splat(builder, mine_v, vi)), vi)
        columns = builder.add(_splat(builder, builder.trunc(start_v, i32), vi), ir.Constant(vi, list(range(_LANES))))
        _compress(builder, keys, mask, ck_ptr, m_v)
        coded = builder.or_(builder.shl(columns, ir.Constant(vi, [1] * _LANES)), same)
        _compress(builder, coded, mask, cs_ptr, m_v)
        lanes = ir.IntType(_LANES)
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lanes, [lanes]), f"llvm.ctpop.i{_LANES}"
        )
        count = builder.call(popcount, [builder.bitcast(mask, lanes)])
        return builder.add(m_v, builder.zext(count, ir.IntType(64)))

    return signature, codegen


@intrinsic
def _code16(typingctx, ck, cs, start, out):
    """:func:`_sortable` codes of ``ck[start:start+16]`` and ``cs[start:start+16]`` (as :func:`_keep16` wrote them)
    into ``out[start:start+16]``."""
    if any(a.layout != "C" for a in (ck, cs, out)):
        return None
    signature = types.void(ck, cs, start, out)

    def codegen(context, builder, sig, args):
        ck_v, cs_v, start_v, out_v = args
        keys_ptr, cs_ptr, out_ptr = (context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 1, 3))
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vf, vi, vq = (ir.VectorType(t, _LANES) for t in (ir.FloatType(), i32, i64))

        def q(value: int) -> ir.Constant:
            return ir.Constant(vq, [value] * _LANES)

        keys = builder.load(builder.bitcast(builder.gep(keys_ptr, [start_v]), vf.as_pointer()), align=4)
        keys = builder.fadd(keys, ir.Constant(vf, [0.0] * _LANES))  # -0.0 becomes +0.0, its equal
        bits = builder.bitcast(builder.fpext(keys, ir.VectorType(ir.DoubleType(), _LANES)), vq)
        bits = builder.select(builder.icmp_signed("==", bits, q(0)), q(int(_SMALLEST_NORMAL)), bits)
        infinite = builder.icmp_signed("==", builder.and_(bits, q(int(_INFINITE))), q(int(_INFINITE)))
        capped = builder.or_(builder.and_(bits, q(int(_SIGN))), q(int(_LARGEST_EXPONENT)))
        bits = builder.select(infinite, capped, bits)
        low = builder.load(builder.bitcast(builder.gep(cs_ptr, [start_v]), vi.as_pointer()), align=4)
        low = builder.zext(low, vq)
        low = builder.xor(low, builder.and_(builder.ashr(bits, q(63)), q((COLUMN_LIMIT - 1) << 1)))  # negative keys
        builder.store(
            builder.or_(bits, low), builder.bitcast(builder.gep(out_ptr, [start_v]), vq.as_pointer()), align=8
        )
        return context.get_dummy_value()

    return signature, codegen


@_compiled
def _keep(row, threshold, classes, mine, ck, cs):
    """:func:`_keep16` over all of ``row``: how many keys are <= ``threshold``."""
    n = row.shape[0]
    m = 0
    done = 0
    if _AVX512:
        while done + _LANES <= n:
            m = _keep16(row, classes, done, threshold, mine, ck, cs, m)
            done += _LANES
    for j in range(done, n):  # branch-free compaction: write always, advance when kept
        ck[m] = row[j]
        cs[m] = j << 1 | (classes[j] == mine)
        m += row[j] <= threshold
    return m


@_compiled
def class_codes(keys, sample, rank, need, classes, own, codes, counts):
    """Per row: its candidates (as in :func:`nearest`) as :func:`_sortable` codes, the last bit saying whether the
    column is of class ``own[row]`` (int32 classes), into ``codes[row]`` (int64 bits of float64s; +inf after them)
    and how many into ``counts[row]``: -1 marks a row whose candidates did not fit or fall short of ``need[row]``
    (NaN keys). ``codes`` needs 16 columns more than the widest row it may hold: vector stores run past a row."""
    rows, n = keys.shape
    width = codes.shape[1] - _LANES
    ck = np.empty(n + _LANES, np.float32)
    cs = np.empty(n + _LANES, np.int32)
    infinite = np.float64(INF_CODE).view(np.int64)
    top_rank = sample.shape[1] + 1
    for r in range(rows):
        row = keys[r]
        mine = own[r]
        rk, lo, hi = min(rank[r], top_rank), 0, top_rank + 1
        while True:
            m = _keep(row, _rank_threshold(sample[r], rk), classes, mine, ck, cs)
            rk, lo, hi = _search_step(m, need[r], width, rk, lo, hi, top_rank)
            if rk == 0:
                break
        out = codes[r]
        if m > width or m < need[r] or n > COLUMN_LIMIT:
            counts[r] = -1
            m = 0
        else:
            counts[r] = m
            done = 0
            if _AVX512:
                while done < m:
                    _code16(ck, cs, done, out)
                    done += _LANES
            for i in range(done, m):
                out[i] = _sortable(ck[i], cs[i] >> 1, np.int64(cs[i] & 1))
        out[m:] = infinite


@_compiled
def sorted_sums(codes, counts, classes, own, relevant, top, vote_k, sums, skipped):
    """:func:`ranking_sums` of rows coded by :func:`class_codes` and sorted as float64, added to ``sums``.

    Rows with ``counts[row] < 0`` are marked in ``skipped``.
    """
    k = top.shape[0]
    most = top.max()
    prefix = np.zeros(max(relevant.max(), most) + 1, np.int64)  # same-class neighbours among the first i
    voters = np.empty(max(vote_k, 1), classes.dtype)
    for r in range(codes.shape[0]):
        if counts[r] < 0:
            skipped[r] = True
            continue
        row = codes[r]
        for j in range(vote_k):
            voters[j] = classes[_column(row[j])]
        sums[2 * k + 2] += _majority(voters, vote_k) == own[r]
        rr = relevant[r]
        if rr == 0:
            continue
        hits = 0
        precision_sum = 0.0
        for i in range(rr):  # branch-free: same-class neighbours are unpredictable
            same = row[i] & 1
            hits += same
            prefix[i + 1] = hits
            precision_sum += same * hits / (i + 1)
        for i in range(rr, most):
            hits += row[i] & 1
            prefix[i + 1] = hits
        sums[2 * k] += precision_sum / rr
        sums[2 * k + 1] += prefix[rr] / rr
        for t in range(k):
            sums[t] += prefix[top[t]] / top[t]
            sums[k + t] += prefix[top[t]] > 0
    return sums
