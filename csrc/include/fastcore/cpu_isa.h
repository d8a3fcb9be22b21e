// The one CPU instruction-set scheme of the CPU kernels (never included by .cu files). Two mechanisms:
//
// * Auto-vectorised loops carry FC_CPU_CLONES: GCC builds an x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA)
//   and baseline copy, and the loader picks one for this CPU. The psABI levels, not the bare "avx512f" /
//   "avx2" features, because only they enable FMA: without it 8-lane products compile to separate
//   multiplies and adds. The clones follow the CPU alone (the choice is made when the library loads);
//   the cap below does not reach them.
// * Hand-written intrinsic paths (FC_TARGET functions) are chosen at run time by active_cpu_isa():
//   the detected level, lowered by a cap. The cap is the lower of FASTCORE_AI_CPU_ISA (read once, at
//   the first call) and set_cpu_isa_cap (tests). Callers write
//     if constexpr (kCpuX86) { if (active_cpu_isa() == CpuIsa::kAvx512) return detail::body_avx512(...); }
//   so non-x86 builds need no #if at the call and no definition of the x86 bodies (a discarded
//   statement odr-uses nothing).
//
// FASTCORE_AI_CPU_ISA = portable | avx2 | avx512 (any case; unset, empty or "auto": no cap). An unknown
// value is ignored (no cap) with one line on stderr: a typo should neither abort a job nor pass silently.
// FASTCORE_AI_ATTENTION_CPU_GENERIC=1 (deprecated: the attention kernels' former switch) means portable.
#pragma once

#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>

// The platform whose intrinsic paths exist (x86-64, GCC or clang): 1 or 0, for #if around a whole file
// of intrinsics; code elsewhere tests kCpuX86. -DFC_CPU_X86=0 builds the portable code alone, as on
// other platforms (a check that those builds compile and link).
#ifndef FC_CPU_X86
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FC_CPU_X86 1
#else
#define FC_CPU_X86 0
#endif
#endif

// ifunc resolvers run before the sanitizer runtime is set up, so sanitized builds take the baseline code.
#if FC_CPU_X86 && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define FC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FC_CPU_CLONES
#endif

// The target attribute of an intrinsic body, for declarations seen by portable code (a header): the
// declaration and the definition must carry the same one. Empty off x86, where the bodies do not exist.
#if FC_CPU_X86
#define FC_TARGET(features) __attribute__((target(features)))
#else
#define FC_TARGET(features)
#endif

namespace fastcore {

inline constexpr bool kCpuX86 = FC_CPU_X86 != 0;

// Ordered: a path for level L runs when active_cpu_isa() >= L. kAvx512 is F + BW (the fast-scan's byte
// shuffles need BW; every AVX-512 CPU but the Xeon Phi has both).
enum class CpuIsa : int { kPortable = 1, kAvx2 = 2, kAvx512 = 3 };

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "portable";
}

namespace cpu_isa_detail {

// The first-use work (CPUID, the environment) stays out of line, so each call site inlines only the
// guarded load of the result.
__attribute__((noinline, cold)) inline CpuIsa detect() {
#if FC_CPU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kPortable;
}

inline bool equals_ignoring_case(const char* a, const char* b) {
  for (; *a && *b; ++a, ++b)
    if (std::tolower(static_cast<unsigned char>(*a)) != *b) return false;
  return *a == *b;
}

// The environment's cap, 0 for none (see the top of this file).
__attribute__((noinline, cold)) inline int environment_cap() {
  int cap = 0;
  const char* value = std::getenv("FASTCORE_AI_CPU_ISA");
  if (value != nullptr && value[0] != '\0' && !equals_ignoring_case(value, "auto")) {
    if (equals_ignoring_case(value, "portable"))
      cap = static_cast<int>(CpuIsa::kPortable);
    else if (equals_ignoring_case(value, "avx2"))
      cap = static_cast<int>(CpuIsa::kAvx2);
    else if (equals_ignoring_case(value, "avx512"))
      cap = static_cast<int>(CpuIsa::kAvx512);
    else
      std::fprintf(stderr, "fastcore_ai: ignoring FASTCORE_AI_CPU_ISA=%s (expected portable, avx2, avx512 or auto)\n",
                   value);
  }
  const char* legacy = std::getenv("FASTCORE_AI_ATTENTION_CPU_GENERIC");
  if (legacy != nullptr && legacy[0] != '\0' && legacy[0] != '0') cap = static_cast<int>(CpuIsa::kPortable);
  return cap;
}

__attribute__((noinline, cold)) inline int capped_level() {
  const int level = static_cast<int>(detect()), cap = environment_cap();
  return cap > 0 && cap < level ? cap : level;
}

inline std::atomic<int>& runtime_cap() {
  static std::atomic<int> cap{0};
  return cap;
}

}  // namespace cpu_isa_detail

// What this CPU (and OS) supports, detected once.
inline CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = cpu_isa_detail::detect();
  return isa;
}

// The level the intrinsic paths use: min(detected, environment cap, set_cpu_isa_cap).
inline CpuIsa active_cpu_isa() {
  static const int environment_level = cpu_isa_detail::capped_level();
  const int runtime = cpu_isa_detail::runtime_cap().load(std::memory_order_relaxed);
  return static_cast<CpuIsa>(runtime > 0 && runtime < environment_level ? runtime : environment_level);
}

// Caps the level at `cap` (1 portable, 2 avx2, 3 avx512; 0 or negative: no cap) on top of the
// environment's cap, which it cannot lift; a cap above what the CPU has changes nothing. Process-wide,
// for tests: set it only while no kernel runs.
inline void set_cpu_isa_cap(int cap) {
  cpu_isa_detail::runtime_cap().store(cap > 0 ? cap : 0, std::memory_order_relaxed);
}

}  // namespace fastcore
