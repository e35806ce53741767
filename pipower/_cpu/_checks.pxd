# Argument checks of every pipower._cpu kernel module (cimported: compiled into each, no import between
# the modules). One set of rules and messages; each failure is an InvalidArgumentError naming the argument.
cimport numpy as cnp


cdef inline object invalid(str msg):
    """InvalidArgumentError(msg), to raise (pipower.errors is imported on this error path only)."""
    from pipower.errors import InvalidArgumentError
    return InvalidArgumentError(msg)


cdef inline int check_threads(object n_threads) except -1:
    """n_threads must be an int >= 1 (not a bool) -> the OpenMP team size."""
    if not isinstance(n_threads, (int, cnp.integer)) or isinstance(n_threads, bool) or n_threads < 1:
        raise invalid(f"n_threads must be an int >= 1, got {n_threads!r}")
    return <int>min(n_threads, 1 << 16)


cdef inline object check_array(object a, str name, tuple dtypes, int ndim, bint contiguous):
    """a must be an ndarray of one of `dtypes` with `ndim` dims, C-contiguous if `contiguous`, else
    contiguous along its last axis only (the KV cache's strided views) -> a."""
    if not isinstance(a, cnp.ndarray):
        raise invalid(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes:
        raise invalid(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {a.dtype}")
    if a.ndim != ndim:
        raise invalid(f"{name} must be {ndim}-D, got shape {a.shape}")
    if contiguous:
        if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
            raise invalid(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    elif a.shape[ndim - 1] > 1 and a.strides[ndim - 1] != a.itemsize:
        raise invalid(f"{name} must be contiguous along its last axis, got strides {a.strides}")
    return a


cdef inline object check_out(object out, str name, tuple shape):
    """`out` None -> a new float32 array of `shape`; else it must be a writeable C-contiguous float32
    array of exactly `shape` -> out."""
    cdef cnp.npy_intp dims[8]
    cdef int i, nd = len(shape)
    if out is None:
        for i in range(nd):
            dims[i] = shape[i]
        return cnp.PyArray_EMPTY(nd, dims, cnp.NPY_FLOAT32, 0)
    check_array(out, name, (cnp.dtype("float32"),), nd, True)
    if out.shape != shape:
        raise invalid(f"{name} must have shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise invalid(f"{name} is read-only")
    return out
