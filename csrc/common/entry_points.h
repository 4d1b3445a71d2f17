// How every op's kernels are reached: for each argument struct Args<T> of an op (its kernels.h),
// one entry point per device, `cpu::run(const cpu::Context&, const Args<T>&)` defined in its
// cpu.cpp and `cuda::run(cuda::Context&, const Args<T>&)` defined in its cuda.cu.  Plain C++ with
// no torch and no CUDA, so that both devices' sources include it.
#pragma once

namespace fastl2r {
namespace cpu {
struct Context;
}  // namespace cpu
namespace cuda {
struct Context;
}  // namespace cuda
}  // namespace fastl2r

// Declares both devices' entry points for Args<T>; used inside namespace fastl2r.
#define FASTL2R_DECLARE_RUN(Args)                         \
  namespace cpu {                                         \
  template <typename T>                                   \
  void run(const Context& context, const Args<T>& args); \
  }                                                       \
  namespace cuda {                                        \
  template <typename T>                                   \
  void run(Context& context, const Args<T>& args);       \
  }
