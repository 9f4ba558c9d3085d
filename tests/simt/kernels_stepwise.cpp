// The stepwise kernels and host loop of csrc/cuda/, compiled as they are by g++ for the SIMT harness
// (simt_cpu.h); their cuBLAS call runs on the CPU through device_primitives.cuh's twin of mm_opmath.
#include "simt_cpu.h"

#include "../../csrc/cuda/recurrence_stepwise.cu"
