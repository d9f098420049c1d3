// What the two AMX kernels (gemm/gemm.cpp for prefill, batched/batched.cpp for batched decode) share:
// the tile configuration's memory layout and Linux's permission to use tile data.
//
// Tile state is per thread, so each kernel loads its own configuration on the thread that runs it and
// releases it after; the permission is per process (arch_prctl ARCH_REQ_XCOMP_PERM, asked once by
// whichever kernel is used first; asking again is harmless).
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace tinyomni {

// The 64-byte operand of ldtilecfg (palette 1): per tile register, bytes per row and rows.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// CPUID leaf 7 (sub-leaf 0) EDX bits of the AMX units.
constexpr int AMX_BF16_BIT = 22;
constexpr int AMX_TILE_BIT = 24;
constexpr int AMX_INT8_BIT = 25;

// Whether CPUID reports AMX-TILE and the units in `edx_bits` (1 << AMX_*_BIT), and Linux then grants
// this process tile data (without the grant the first tile instruction faults).
inline bool amx_granted(unsigned edx_bits) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const unsigned want = edx_bits | (1u << AMX_TILE_BIT);
  if ((d & want) != want) return false;
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

}  // namespace tinyomni
