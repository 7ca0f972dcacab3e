"""Vector kernels for :mod:`metriclab.metrics.ranking`, written as numba intrinsics in LLVM IR: 16 keys at a time.

Each takes 16 consecutive keys, tests them against a threshold and packs the kept lanes' values into
an output array. With AVX-512 the lanes are packed in a register by `vcompress` and the whole vector
stored (a compressing store to memory is microcoded and slow on Intel cores). AVX2 has no compress, and
LLVM's expansion of one is lane by lane (no faster than the plain loop), so there each half of 8 lanes is
packed by one `vpermd` whose lane order comes from a table of the 256 masks, the usual left-pack. Either
way a kernel writes up to 15 entries past the ones it keeps: outputs need that much room. The callers use
them only where :data:`SIMD` is true (AVX-512 or AVX2) and run plain loops elsewhere.

Codes: a key ``k`` (float32) at ``column`` becomes a float64 whose order is ``(k, column)``: ``k``
widened to float64 leaves 29 mantissa bits zero, which hold ``column`` (bit-reversed under a negative
key, whose bits grow away from zero) and then one flag bit. Zero takes the smallest normal float64
and an infinite key the largest exponent, so no code is subnormal or NaN; numpy sorts rows of them
as float64.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.core.extending import intrinsic

LANES = 16
# numba compiles for the host CPU's features, or for those NUMBA_CPU_FEATURES (or NUMBA_CPU_NAME=generic) names
_FEATURES = llvm.get_host_cpu_features().flatten() if config.CPU_FEATURES is None else config.CPU_FEATURES
AVX512 = "+avx512f" in _FEATURES.split(",")
AVX2 = "+avx2" in _FEATURES.split(",")
SIMD = AVX512 or AVX2  # the kernels below compile to vector code; elsewhere the callers' plain loops run

COLUMN_LIMIT = 1 << 28  # columns that fit a code beside its flag bit
SIGN = -(1 << 63)
SMALLEST_NORMAL = 1 << 52
LARGEST_EXPONENT = 0x7FE << 52
INFINITE = 0x7FF << 52  # the bits of +inf: exponent all ones

_F32, _I32, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
_VF, _VI, _VQ = (ir.VectorType(t, LANES) for t in (_F32, _I32, _I64))
_HALF = LANES // 2  # the lanes of one AVX2 register
_V8I = ir.VectorType(_I32, _HALF)


def _splat(builder: ir.IRBuilder, value: ir.Value, vector: ir.VectorType) -> ir.Value:
    """``value`` in every lane of a ``vector``."""
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vector.count), [0] * vector.count)
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)


def _at(builder: ir.IRBuilder, ptr: ir.Value, index: ir.Value, vector: ir.VectorType) -> ir.Value:
    """A pointer to the ``vector`` starting at ``ptr[index]``."""
    return builder.bitcast(builder.gep(ptr, [index]), vector.as_pointer())


def _load(builder: ir.IRBuilder, ptr: ir.Value, index: ir.Value, vector: ir.VectorType) -> ir.Value:
    return builder.load(_at(builder, ptr, index, vector), align=4)


def _pack(builder: ir.IRBuilder, vector: ir.Value, mask: ir.Value, ptr: ir.Value, m: ir.Value) -> None:
    """Store ``vector``'s lanes under ``mask`` at ``ptr[m:]`` in order, then garbage up to a whole vector."""
    if not AVX512:
        _pack_halves(builder, vector, mask, ptr, m)
        return
    kind = vector.type
    name = f"llvm.experimental.vector.compress.v{kind.count}{'f' if kind.element == _F32 else 'i'}32"
    compress = cgutils.get_or_insert_function(builder.module, ir.FunctionType(kind, [kind, mask.type, kind]), name)
    packed = builder.call(compress, [vector, mask, ir.Constant(kind, ir.Undefined)])
    builder.store(packed, _at(builder, ptr, m, kind), align=4)


def _left_pack_table(module: ir.Module) -> ir.GlobalVariable:
    """The module's table of ``vpermd`` lane orders: entry ``b`` lists the lanes set in the 8 bits ``b``, first."""
    name = "metriclab_left_pack"
    if name not in module.globals:
        orders = [[i for i in range(_HALF) if b >> i & 1] for b in range(1 << _HALF)]
        rows = [ir.Constant(_V8I, order + [0] * (_HALF - len(order))) for order in orders]
        cgutils.global_constant(module, name, ir.Constant(ir.ArrayType(_V8I, len(rows)), rows)).align = 32
    return module.globals[name]


def _pack_halves(builder: ir.IRBuilder, vector: ir.Value, mask: ir.Value, ptr: ir.Value, m: ir.Value) -> None:
    """:func:`_pack` for AVX2: each 8-lane half permuted by its mask's entry of :func:`_left_pack_table`."""
    table = _left_pack_table(builder.module)
    permd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I, [_V8I, _V8I]), "llvm.x86.avx2.permd")
    ints = builder.bitcast(vector, _VI) if vector.type.element == _F32 else vector
    element = ptr.type.pointee
    bits = builder.bitcast(mask, ir.IntType(LANES))
    for half in range(2):
        lanes = builder.shuffle_vector(
            ints, ir.Constant(_VI, ir.Undefined), ir.Constant(_V8I, [half * _HALF + i for i in range(_HALF)])
        )
        byte = builder.trunc(builder.lshr(bits, ir.Constant(bits.type, half * _HALF)), ir.IntType(_HALF))
        order = builder.load(builder.gep(table, [ir.Constant(_I32, 0), builder.zext(byte, _I32)]), align=32)
        packed = builder.bitcast(builder.call(permd, [lanes, order]), ir.VectorType(element, _HALF))
        builder.store(packed, _at(builder, ptr, m, packed.type), align=4)
        m = _count(builder, byte, m)


def _count(builder: ir.IRBuilder, mask: ir.Value, m: ir.Value) -> ir.Value:
    """``m`` plus the number of lanes set in ``mask`` (a vector of bits, or their integer)."""
    bits = mask.type if isinstance(mask.type, ir.IntType) else ir.IntType(mask.type.count)
    popcount = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(bits, [bits]), f"llvm.ctpop.i{bits.width}"
    )
    return builder.add(m, builder.zext(builder.call(popcount, [builder.bitcast(mask, bits)]), _I64))


def _under(
    builder: ir.IRBuilder, keys_ptr: ir.Value, start: ir.Value, threshold: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """``(keys, mask)``: the 16 keys from ``keys_ptr[start]`` and which of them are <= ``threshold``."""
    keys = _load(builder, keys_ptr, start, _VF)
    return keys, builder.fcmp_ordered("<=", keys, _splat(builder, threshold, _VF))


def _columns(builder: ir.IRBuilder, start: ir.Value) -> ir.Value:
    """The int32 columns ``start..start+15``."""
    return builder.add(_splat(builder, builder.trunc(start, _I32), _VI), ir.Constant(_VI, list(range(LANES))))


def _data(context, builder, sig, args, *which: int) -> list[ir.Value]:
    """The data pointers of the array arguments at positions ``which``."""
    return [context.make_array(sig.args[i])(context, builder, args[i]).data for i in which]


def _contiguous(*arrays: types.Type) -> bool:
    return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)


@intrinsic
def columns16(typingctx, row, start, threshold, out, m):
    """Store the columns ``start..start+15`` whose key is <= ``threshold`` at ``out[m:]``; returns the new ``m``."""
    if not _contiguous(row, out):
        return None
    signature = types.int64(row, start, threshold, out, m)

    def codegen(context, builder, sig, args):
        _, start_v, threshold_v, _, m_v = args
        keys_ptr, out_ptr = _data(context, builder, sig, args, 0, 3)
        _, mask = _under(builder, keys_ptr, start_v, threshold_v)
        _pack(builder, _columns(builder, start_v), mask, out_ptr, m_v)
        return _count(builder, mask, m_v)

    return signature, codegen


@intrinsic
def keep16(typingctx, row, classes, start, threshold, mine, keys, tags, m):
    """Of the columns ``start..start+15`` whose key is <= ``threshold``: the keys into ``keys[m:]`` and the tags
    ``column << 1 | (classes[column] == mine)`` into ``tags[m:]``; returns the new ``m``."""
    if not _contiguous(row, classes, keys, tags) or classes.dtype != types.int32 or mine != types.int32:
        return None
    signature = types.int64(row, classes, start, threshold, mine, keys, tags, m)

    def codegen(context, builder, sig, args):
        _, _, start_v, threshold_v, mine_v, _, _, m_v = args
        row_ptr, classes_ptr, keys_ptr, tags_ptr = _data(context, builder, sig, args, 0, 1, 5, 6)
        values, mask = _under(builder, row_ptr, start_v, threshold_v)
        same = builder.zext(
            builder.icmp_signed("==", _load(builder, classes_ptr, start_v, _VI), _splat(builder, mine_v, _VI)), _VI
        )
        columns = _columns(builder, start_v)
        _pack(builder, values, mask, keys_ptr, m_v)
        _pack(builder, builder.or_(builder.shl(columns, ir.Constant(_VI, [1] * LANES)), same), mask, tags_ptr, m_v)
        return _count(builder, mask, m_v)

    return signature, codegen


@intrinsic
def code16(typingctx, keys, tags, start, out):
    """The codes (module docstring) of ``keys[start:start+16]`` with flags and columns from ``tags`` (as
    :func:`keep16` wrote them), as int64 bits, into ``out[start:start+16]``."""
    if not _contiguous(keys, tags, out):
        return None
    signature = types.void(keys, tags, start, out)

    def codegen(context, builder, sig, args):
        start_v = args[2]
        keys_ptr, tags_ptr, out_ptr = _data(context, builder, sig, args, 0, 1, 3)

        def q(value: int) -> ir.Constant:
            return ir.Constant(_VQ, [value] * LANES)

        values = builder.fadd(_load(builder, keys_ptr, start_v, _VF), ir.Constant(_VF, [0.0] * LANES))  # -0.0 -> +0.0
        bits = builder.bitcast(builder.fpext(values, ir.VectorType(ir.DoubleType(), LANES)), _VQ)
        bits = builder.select(builder.icmp_signed("==", bits, q(0)), q(SMALLEST_NORMAL), bits)
        infinite = builder.icmp_signed("==", builder.and_(bits, q(INFINITE)), q(INFINITE))
        bits = builder.select(infinite, builder.or_(builder.and_(bits, q(SIGN)), q(LARGEST_EXPONENT)), bits)
        low = builder.zext(_load(builder, tags_ptr, start_v, _VI), _VQ)
        low = builder.xor(low, builder.and_(builder.ashr(bits, q(63)), q((COLUMN_LIMIT - 1) << 1)))  # negative keys
        builder.store(builder.or_(bits, low), _at(builder, out_ptr, start_v, _VQ), align=8)
        return context.get_dummy_value()

    return signature, codegen
