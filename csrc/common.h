// Helpers shared by the C++ CPU kernels (csrc/*.cpp).
#pragma once

#if defined(__GNUC__)
#define AF_INLINE inline __attribute__((always_inline))
#else
#define AF_INLINE inline
#endif
