// Every raw-pointer kernel cpu.cpp binds, for the instruction set of this build (isa.h): cpu.cpp
// includes this one header, and so does the test that checks a variant this CPU does not run
// (`g++ -fsyntax-only` with that variant's flags, engine.kernels.syntax_check_command). A new
// kernel header is added here.
#pragma once

#include "decode_step.h"
#include "sampling.h"
