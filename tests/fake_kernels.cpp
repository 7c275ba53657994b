// Stand-ins for a kernel library, for the tests of the proof by execution (llama.kernel_build.prove_library):
// built with -DREFUSED its entry point executes an illegal instruction (as a CPU or virtual machine that
// lists an instruction set but refuses it would), otherwise it returns a wrong result.
#include <cstdint>

extern "C" int codellama_gemv_bf16(const uint16_t*, int64_t, const uint16_t*, int64_t, uint16_t* y, int64_t y_len,
                                   int64_t, int64_t, int64_t, int) {
#ifdef REFUSED
  __builtin_trap();
#endif
  for (int64_t i = 0; i < y_len; ++i) y[i] = 0;
  return 0;
}
