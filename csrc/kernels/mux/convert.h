// The mux kernels' 16-bit conversions and store_as are the shared ones of fastcore/common.h (one
// implementation for every family); this header stays so the mux sources can keep including it.
#pragma once

#include "fastcore/common.h"
