// Host stand-in for CUDA's header (kernels/host_twin.py): everything is in cuda_shim.h.
#pragma once
#include "../cuda_shim.h"
