// Every raw-pointer kernel cpu.cpp binds, for the instruction set of this build (isa.h): cpu.cpp
// includes this one header, and so does the test that checks a variant this CPU does not run
// (compiled with that variant's flags and thrown away, engine.kernels.compile_check_command). A
// new kernel header is added here.
#pragma once

#include "decode_step.h"
#include "sampling.h"
#include "text_products.h"
