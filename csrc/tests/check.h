// A minimal check harness for the native tests: no framework to install, failures counted and printed.
#pragma once
#include <cstdio>

inline int& fc_failures() {
  static int failures = 0;
  return failures;
}

#define FC_EXPECT(cond, ...)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ++fc_failures();                                                         \
      std::fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
    }                                                                          \
  } while (0)
