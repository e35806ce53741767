# Declarations shared with _ffn.pyx: the quantized activations of the integer q4 dots.
cdef extern from "_int8_impl.h" nogil:
    ctypedef struct pp_xq:
        pass


cdef class QuantizedActivations:
    cdef char *buf          # T tokens x pp_xq_bytes(K)
    cdef pp_xq *rows       # [T] views into buf
    cdef readonly Py_ssize_t T, K
    cdef readonly str fmt   # the weight format the layout is for
    cdef readonly bint panels   # laid out for weight panels (_panel_impl.h)
