# Declarations shared with _ffn.pyx and _panel.pyx: the quantized activations of the integer dots and the
# choice of their kernel (_isa_impl.h).
from ._checks cimport invalid

cdef extern from "_int8_impl.h" nogil:
    ctypedef struct pp_xq:
        pass
    int pp_isa_mask()
    int pp_isa_default()
    enum: PP_ISA_COUNT
    const char *pp_isa_names[]


cdef inline tuple isa_names():
    """Every integer-dot kernel level's name, slowest first, as _isa_impl.h spells them (the one source)."""
    cdef list names = []
    cdef int level
    for level in range(PP_ISA_COUNT):          # a loop, not a generator: inline code shared across modules
        names.append(pp_isa_names[level].decode())
    return tuple(names)


cdef inline tuple int_isas():
    """Names of the integer-dot kernels this CPU and build run, slowest first (levels of _isa_impl.h)."""
    cdef int mask = pp_isa_mask(), level
    cdef tuple names = isa_names()
    cdef list have = []
    for level in range(PP_ISA_COUNT):
        if (mask >> level) & 1:
            have.append(names[level])
    return tuple(have)


cdef inline int check_simd(object simd) except -1:
    """The `simd` argument of an integer-dot kernel -> its level (PP_ISA_*). True: the best kernel this
    machine runs, or the one the PIPOWER_INT_ISA environment variable names; False: portable C; a name
    ("c", "avx2", "avxvnni", "avx512vnni"): that kernel, which this machine must run (tests compare them).
    Every level gives the same bits."""
    cdef tuple names = isa_names()
    cdef int level
    if isinstance(simd, str):
        if simd not in names:
            raise invalid(f"simd must be True, False or one of {names}, got {simd!r}")
        level = names.index(simd)
        if not (pp_isa_mask() >> level) & 1:
            raise invalid(f"simd={simd!r}: this CPU or build has no {simd} integer-dot kernel "
                          f"(available: {', '.join(int_isas())})")
        return level
    if not simd:
        return 0
    level = pp_isa_default()
    if level < 0:
        import os
        raise invalid(f"PIPOWER_INT_ISA={os.environ.get('PIPOWER_INT_ISA')!r} names no integer-dot kernel this "
                      f"machine runs (available: {', '.join(int_isas())})")
    return level


cdef class QuantizedActivations:
    cdef char *buf          # T tokens x pp_xq_bytes(K)
    cdef pp_xq *rows       # [T] views into buf
    cdef readonly Py_ssize_t T, K
    cdef readonly str fmt   # the weight format the layout is for
    cdef readonly bint panels   # laid out for weight panels (_panel_impl.h)
