"""Exact per-row ranking on the CPU, compiled with numba: each key row's nearest columns in order, and
a query's ranking metrics from the classes of its ranked neighbours.

:mod:`metriclab.metrics.retrieval` computes key rows (smaller = nearer) chunk by chunk and calls these on
worker threads (the kernels release the GIL). Its CPU metrics use :func:`class_codes` and
:func:`sorted_sums` (end of this file), and :func:`nearest` and :func:`ranking_sums` for the rare rows whose
candidates overflow their buffers. Order is by key, then by column, exactly: MAP@R of a
60k gallery ranks the R ~ 6,000 nearest of each query, so this sort is most of an evaluation.
The loops over a row's keys run 16 keys at a time where the CPU has AVX-512 or AVX2 (:mod:`metriclab.metrics.simd`).

How :func:`nearest` sorts a row: the keys up to a threshold (placed from a sorted sample of the row) are
compacted in column order, dealt into about one bucket per key by a linear map of the key between
the smallest and largest kept (monotone, so bucket order is key order), and each bucket is sorted
by insertion as int64 ``(key, column)`` codes (by a heap sort past 32 codes). Buckets after the one
that completes the row's ``need`` are never filled. A row of 60k keys with 6,000 needed takes
~150 us on a 2-core AMD EPYC, against ~300-400 us for numpy's sort of the same codes.

Callers reach these kernels through :mod:`metriclab.metrics.kernels`, which compiles the exported ones
(:data:`metriclab.metrics.kernels.SIGNATURES`) once into a native object and loads that without numba: numba's
own set-up at a process's first compiled call takes 0.3-0.7 s. The kernels therefore allocate nothing (callers
pass outputs and scratch) and raise nothing (``error_model="numpy"``). numba's dispatchers, cached on disk
(``cache=True``), remain the fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from metriclab.metrics.simd import (
    COLUMN_LIMIT,
    INFINITE,
    LANES,
    LARGEST_EXPONENT,
    SIGN,
    SIMD,
    SMALLEST_NORMAL,
    code16,
    columns16,
    keep16,
)

INSERTION_MAX = 32  # larger buckets (many equal or crowded keys) are heap-sorted


def _compiled(func: Callable) -> Callable:
    """``func`` compiled by numba, releasing the GIL, cached on disk where numba finds a writable place."""
    try:
        return njit(nogil=True, cache=True, error_model="numpy")(func)
    except RuntimeError:  # numba found no writable cache directory: compile in each process instead
        return njit(nogil=True, error_model="numpy")(func)


@_compiled
def _code(key, column):
    """An int64 that sorts like ``(key, column)``: the float's bits made monotone, above the column."""
    bits = np.int64(np.float32(key + np.float32(0.0)).view(np.int32))  # + 0: -0.0 becomes +0.0, its equal
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return (bits << 32) | column


@_compiled
def codes(values, columns, out):
    """:func:`_code` of each ``(values[i, j], columns[i, j])`` into ``out``: sorting a row of these sorts it by key,
    then column."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = _code(values[i, j], columns[i, j])


@_compiled
def _sift(codes, start, root, end):
    """Moves ``codes[start + root]`` down the max-heap ``codes[start:end]`` (children of i: 2i + 1, 2i + 2)."""
    value = codes[start + root]
    while True:
        child = 2 * root + 1
        if start + child >= end:
            break
        if start + child + 1 < end and codes[start + child + 1] > codes[start + child]:
            child += 1
        if codes[start + child] <= value:
            break
        codes[start + root] = codes[start + child]
        root = child
    codes[start + root] = value


@_compiled
def _heapsort(codes, start, end):
    """Sorts ``codes[start:end]`` in place (large buckets: many equal or crowded keys), allocating nothing."""
    n = end - start
    for root in range(n // 2 - 1, -1, -1):
        _sift(codes, start, root, end)
    for last in range(end - 1, start, -1):
        codes[start], codes[last] = codes[last], codes[start]
        _sift(codes, start, 0, last)


@_compiled
def _candidates(row, threshold, columns):
    """Writes the columns of ``row``'s keys <= ``threshold`` to ``columns`` in order; returns how many."""
    n = row.shape[0]
    m = 0
    done = 0
    if SIMD:  # 13 us for a 60k-key row on a Xeon, against 75-100 us for the loop below
        while done + LANES <= n:
            m = columns16(row, done, threshold, columns, m)
            done += LANES
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
            _heapsort(codes, start, end)
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
def nearest(keys, sample, rank, need, values, out, ck, cc, scratch):
    """``values`` of the columns of each row's ``need[row]`` smallest keys, by key then column, into ``out[row]``.

    ``values`` maps a column to what is returned (``arange`` for the columns themselves, the
    gallery's class ids for the classes of the neighbours). ``sample`` holds sorted keys of each row
    (any columns); the row's threshold starts at ``sample[row, rank[row] - 1]`` (everything when
    ``rank`` exceeds the sample) and doubles its rank until ``need`` keys are under it. Entries
    past a row's ``need`` are left as they were. Scratch: ``ck`` and ``cc`` of a row's length,
    ``scratch`` of three times that plus one.
    """
    n = keys.shape[1]
    bucket, codes, ends = scratch[:n], scratch[n : 2 * n], scratch[2 * n :]
    for r in range(keys.shape[0]):
        _sort_row(keys[r], sample[r], rank[r], need[r], values, out[r], ck, cc, bucket, codes, ends)


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
def _add_ranked(ranked, mask, want, r, top, prefix, sums):
    """Adds one query's precision@t and hit@t (each ``t`` in ``top``), AP@R and R-precision (``r`` > 0) to ``sums``.

    Position ``i`` holds a neighbour of the query's class where ``ranked[i] & mask == want``; ``ranked`` has at
    least ``max(top, r)`` positions and ``prefix`` room for as many plus one.
    """
    k = top.shape[0]
    hits = 0
    precision_sum = 0.0
    for i in range(r):  # branch-free: same-class neighbours are unpredictable
        same = (ranked[i] & mask) == want
        hits += same
        prefix[i + 1] = hits
        precision_sum += same * hits / (i + 1)
    most = 0
    for t in range(k):  # a loop, not top.max(): numba's reductions call its runtime library (see kernels.py)
        most = max(most, top[t])
    for i in range(r, most):
        hits += (ranked[i] & mask) == want
        prefix[i + 1] = hits
    sums[2 * k] += precision_sum / r
    sums[2 * k + 1] += prefix[r] / r
    for t in range(k):
        sums[t] += prefix[top[t]] / top[t]
        sums[k + t] += prefix[top[t]] > 0


@_compiled
def ranking_sums(neighbours, query_ids, relevant, top, vote_k, sums, prefix):
    """Adds to ``sums`` (``2 * len(top) + 3`` of them) the sums over queries with ``relevant > 0`` of precision@t and
    hit@t (each ``t`` in ``top``), AP@R and R-precision, then the number of queries whose ``vote_k`` nearest vote
    their own class.

    ``neighbours[row]`` are the classes of the row's ranked neighbours, at least
    ``max(top, vote_k, relevant[row])`` of them. The vote is a majority; among equally frequent
    classes the one ranked nearest wins. Scratch: ``prefix``, ``max(relevant.max(), top.max()) + 1``.
    """
    k = top.shape[0]
    for row in range(neighbours.shape[0]):
        ranked = neighbours[row]
        own = query_ids[row]
        sums[2 * k + 2] += _majority(ranked, vote_k) == own
        if relevant[row] > 0:
            _add_ranked(ranked, -1, own, relevant[row], top, prefix, sums)  # mask -1: the whole class id


# -- ranking metrics from one sorted row of codes -------------------------------------------------------------
# A query's ranking metrics only ask, position by position, whether the neighbour is of the query's class, and
# the classes of its `vote_k` nearest. So each candidate becomes one float64 that sorts like (key, column) and
# carries that answer in its last bit (:mod:`metriclab.metrics.simd` describes the code); numpy sorts rows of these
# (with AVX-512 where the CPU has it, ~2x faster than int64 codes of the same order) and one pass over each sorted
# row sums the metrics. A row's candidates are first kept as (key, tag) pairs, the tag being
# ``column << 1 | same class``, then coded (:func:`class_codes`).

_INF_BITS = np.float64(np.inf).view(np.int64)  # after a row's codes: sorts last


@_compiled
def _sortable(key, tag):
    """The int64 bits of the code of ``key`` with ``tag`` (:mod:`metriclab.metrics.simd`), one at a time."""
    bits = np.float64(key + np.float32(0.0)).view(np.int64)  # + 0: -0.0 becomes +0.0, its equal
    if bits == 0:
        bits = SMALLEST_NORMAL
    elif (bits & INFINITE) == INFINITE:
        bits = (bits & SIGN) | LARGEST_EXPONENT
    low = np.int64(tag)
    if bits < 0:
        low ^= (COLUMN_LIMIT - 1) << 1
    return bits | low


@_compiled
def _column(code):
    """The column in ``code``."""
    low = (code >> 1) & (COLUMN_LIMIT - 1)
    return low if code >= 0 else COLUMN_LIMIT - 1 - low


@_compiled
def _keep(row, threshold, classes, mine, keys, tags):
    """Writes ``row``'s keys <= ``threshold`` to ``keys`` and their tags (``column << 1 | (classes[column] ==
    mine)``) to ``tags`` in column order; returns how many. Both need 16 entries of room past the last kept."""
    n = row.shape[0]
    m = 0
    done = 0
    if SIMD:
        while done + LANES <= n:
            m = keep16(row, classes, done, threshold, mine, keys, tags, m)
            done += LANES
    for j in range(done, n):  # branch-free compaction: write always, advance when kept
        keys[m] = row[j]
        tags[m] = j << 1 | (classes[j] == mine)
        m += row[j] <= threshold
    return m


@_compiled
def _code_row(keys, tags, m, out):
    """The codes of ``keys[:m]`` and ``tags[:m]`` into ``out[:m]``, +inf after them."""
    done = 0
    if SIMD:
        while done < m:
            code16(keys, tags, done, out)
            done += LANES
    for i in range(done, m):
        out[i] = _sortable(keys[i], tags[i])
    out[m:] = _INF_BITS


@_compiled
def class_codes(keys, sample, rank, need, classes, own, codes, counts, kept, tags):
    """Per row: its candidates (the keys under a threshold found from ``sample`` and ``rank`` as :func:`nearest`
    finds it) as codes whose flag says whether the column is of class ``own[row]`` (int32 classes), into
    ``codes[row]`` (int64 bits of float64s; +inf after them), and how many into ``counts[row]``: -1 where no
    threshold keeps between ``need[row]`` and the width of ``codes`` - 16 (many equal keys, or NaN keys).
    Scratch: ``kept`` (float32) and ``tags`` (int32) of a row's length + 16."""
    rows, n = keys.shape
    width = codes.shape[1] - LANES
    top_rank = sample.shape[1] + 1
    for r in range(rows):
        rk, lo, hi = min(rank[r], top_rank), 0, top_rank + 1
        while True:
            m = _keep(keys[r], _rank_threshold(sample[r], rk), classes, own[r], kept, tags)
            rk, lo, hi = _search_step(m, need[r], width, rk, lo, hi, top_rank)
            if rk == 0:
                break
        if m < need[r] or m > width or n > COLUMN_LIMIT:
            counts[r] = -1
            m = 0
        else:
            counts[r] = m
        _code_row(kept, tags, m, codes[r])


@_compiled
def sorted_sums(codes, counts, classes, own, relevant, top, vote_k, sums, skipped, prefix, voters):
    """:func:`ranking_sums` of rows coded by :func:`class_codes` and sorted as float64 (the first ``counts[row]`` of
    each), added to ``sums``. Rows with ``counts[row] < 0`` are marked in ``skipped``. Scratch: ``prefix`` as for
    :func:`ranking_sums`, ``voters`` of ``vote_k`` classes.
    """
    k = top.shape[0]
    for r in range(codes.shape[0]):
        if counts[r] < 0:
            skipped[r] = True
            continue
        row = codes[r]
        for j in range(vote_k):
            voters[j] = classes[_column(row[j])]
        sums[2 * k + 2] += _majority(voters, vote_k) == own[r]
        if relevant[r] > 0:
            _add_ranked(row, 1, 1, relevant[r], top, prefix, sums)  # the flag bit: of the query's class
