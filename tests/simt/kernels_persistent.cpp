// The persistent kernels of csrc/cuda/, compiled as they are by g++ for the SIMT harness (simt_cpu.h).
#include "simt_cpu.h"

#include "../../csrc/cuda/recurrence_persistent.cu"
