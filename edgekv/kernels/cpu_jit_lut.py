"""A 16-entry table lookup of 16 nibbles in registers, for the compiled CPU path (numba;
imported only by cpu_jit_loops.py): how it reads the codebook format's codes.

    out[o : o + 16] = s * table[(row[j : j + 16] >> shift) & 15]        (fp32)

The codebook's 16 levels fit one AVX-512 register, and one permute instruction (vpermps)
looks up 16 codes at once; with AVX2, two 8-lane permutes and a select by the code's top
bit. numba cannot express a permute by a runtime index, so this is written in LLVM IR as a
numba intrinsic. The instruction set is the one numba compiles for (the host's, or
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES where set): elsewhere (ARM, older x86) the same IR
loads the 16 entries one by one, correct and slower.

Measured (one thread, a row of D 64 decoded and dotted with one query, groups of 16 with
one scale each, Rocket Lake): the level polynomial of degree 5 and a per-value scale took
56 ns a row, this lookup 24 ns (AVX2 lookup 31 ns); int4's convert-and-subtract 17 ns.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

_F32, _I32 = ir.FloatType(), ir.IntType(32)
_F32X8, _F32X16 = ir.VectorType(_F32, 8), ir.VectorType(_F32, 16)
_I32X8, _I32X16 = ir.VectorType(_I32, 8), ir.VectorType(_I32, 16)
_I8X16 = ir.VectorType(ir.IntType(8), 16)
MODES = ("avx512", "avx2", "scalar")


def target_features() -> set[str]:
    """The CPU features numba compiles for: NUMBA_CPU_FEATURES where NUMBA_CPU_NAME is set
    (a portable cache), the host's otherwise."""
    if config.CPU_NAME:
        return {f[1:] for f in (config.CPU_FEATURES or "").split(",") if f.startswith("+")}
    import llvmlite.binding as llvm

    return {k for k, v in llvm.get_host_cpu_features().items() if v}


def target_mode() -> str:
    """The lookup the target's instruction set allows (one of MODES)."""
    feats = target_features()
    return "avx512" if "avx512f" in feats else "avx2" if "avx2" in feats else "scalar"


def _splat(builder, value, vtype):
    """A scalar -> a vector of ``vtype`` with it in every lane."""
    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count)
    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined), mask)


def _lookup(builder, mode, table_ptr, idx):
    """table_ptr (float*) to 16 fp32 entries, idx (16 x i32, each in [0, 16)) -> the 16
    entries, (16 x float)."""
    if mode == "avx512":
        levels = builder.load(builder.bitcast(table_ptr, _F32X16.as_pointer()), align=4)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F32X16, [_F32X16, _I32X16]),
            "llvm.x86.avx512.permvar.sf.512")
        return builder.call(fn, [levels, idx])
    if mode == "avx2":  # vpermps reads an index's low 3 bits: a select by the 4th
        lo = builder.load(builder.bitcast(table_ptr, _F32X8.as_pointer()), align=4)
        hi = builder.load(builder.bitcast(builder.gep(table_ptr, [ir.Constant(_I32, 8)]),
                                          _F32X8.as_pointer()), align=4)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_F32X8, [_F32X8, _I32X8]), "llvm.x86.avx2.permps")
        halves = []
        for p in range(2):
            part = builder.shuffle_vector(idx, ir.Constant(_I32X16, ir.Undefined),
                                          ir.Constant(_I32X8, list(range(8 * p, 8 * p + 8))))
            top = builder.icmp_unsigned(">", part, ir.Constant(_I32X8, [7] * 8))
            halves.append(builder.select(top, builder.call(fn, [hi, part]),
                                         builder.call(fn, [lo, part])))
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_I32X16, list(range(16))))
    out = ir.Constant(_F32X16, ir.Undefined)
    for lane in range(16):
        i = builder.extract_element(idx, ir.Constant(_I32, lane))
        value = builder.load(builder.gep(table_ptr, [i]))
        out = builder.insert_element(out, value, ir.Constant(_I32, lane))
    return out


def make_lut16(mode: str):
    """The intrinsic ``lut16(table, row, j, shift, s, out, o)`` for one instruction set:
    table (>= 16,) fp32 C-contiguous, row uint8 with row[j : j + 16] in bounds, shift 0 or
    4, s fp32, out fp32 with out[o : o + 16] in bounds (unchecked, as numba's own
    indexing without boundscheck)."""
    if mode not in MODES:
        raise ValueError(f"unknown lookup mode {mode!r}: one of {', '.join(MODES)}")

    @intrinsic
    def lut16(typingctx, table, row, j, shift, s, out, o):
        sig = types.void(table, row, j, shift, s, out, o)

        def codegen(context, builder, signature, args):
            tv, rv, jv, shv, sv, ov, oo = args
            tys = signature.args
            table_ptr = context.make_array(tys[0])(context, builder, tv).data
            row_ptr = context.make_array(tys[1])(context, builder, rv).data
            out_ptr = context.make_array(tys[5])(context, builder, ov).data
            codes = builder.load(builder.bitcast(builder.gep(row_ptr, [jv]),
                                                 _I8X16.as_pointer()), align=1)
            sh = context.cast(builder, shv, tys[3], types.int32)
            idx = builder.lshr(builder.zext(codes, _I32X16), _splat(builder, sh, _I32X16))
            idx = builder.and_(idx, ir.Constant(_I32X16, [15] * 16))
            scale = context.cast(builder, sv, tys[4], types.float32)
            values = builder.fmul(_lookup(builder, mode, table_ptr, idx),
                                  _splat(builder, scale, _F32X16))
            builder.store(values, builder.bitcast(builder.gep(out_ptr, [oo]),
                                                  _F32X16.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return lut16


lut16 = make_lut16(target_mode())
