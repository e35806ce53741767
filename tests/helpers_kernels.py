"""The integer-dot kernels a test can ask for by `simd=`: True (the default one), False (portable C) and
every named kernel this CPU and build run ("avx2", "avxvnni", "avx512vnni"), so each is checked against
the reference on machines that have it."""
from pipower import _cpu


def int_kernels() -> tuple:
    if not _cpu.AVAILABLE:
        return (True, False)
    from pipower._cpu import _linear
    names, _ = _linear.integer_kernels()
    return (True, False) + tuple(n for n in names if n != "c")


INT_SIMD = int_kernels()
