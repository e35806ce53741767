/* The AVX2 and AVX-VNNI integer dot kernels: _int8_avx2_body.h compiled once per instruction set under
 * a target pragma, so they exist in every x86-64 build (-march=native or PIPOWER_PORTABLE) and run where
 * CPUID allows (_isa_impl.h picks). Functions: pp_avx2_* and pp_avxvnni_* (dotn_int, gemm_panel,
 * and pp_avx2_xq_block for the quantizer). Included by _int8_impl.h after the types it needs. */
#ifndef PIPOWER_INT8_AVX2_IMPL_H
#define PIPOWER_INT8_AVX2_IMPL_H

#if PP_HAVE_AVX2I
#  if defined(__clang__)
#    pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#  else
#    pragma GCC push_options
#    pragma GCC target("avx2,fma,f16c")
#  endif
#  define PP_V_VNNI 0
#  define PP_V(name) pp_avx2_##name
#  include "_int8_avx2_body.h"
#  undef PP_V
#  undef PP_V_VNNI
#  if defined(__clang__)
#    pragma clang attribute pop
#  else
#    pragma GCC pop_options
#  endif
#endif

#if PP_HAVE_AVXVNNI
#  if defined(__clang__)
#    pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avxvnni"))), apply_to = function)
#  else
#    pragma GCC push_options
#    pragma GCC target("avx2,fma,f16c,avxvnni")
#  endif
#  define PP_V_VNNI 1
#  define PP_V(name) pp_avxvnni_##name
#  include "_int8_avx2_body.h"
#  undef PP_V
#  undef PP_V_VNNI
#  if defined(__clang__)
#    pragma clang attribute pop
#  else
#    pragma GCC pop_options
#  endif
#endif

#endif /* PIPOWER_INT8_AVX2_IMPL_H */
