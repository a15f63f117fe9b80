// Memory-safety re-checks on the C++ side; they throw, pybind11 turns that into RuntimeError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define LLMK_CHECK(cond, ...)                                                        \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::ostringstream llmk_msg_;                                                  \
      llmk_msg_ << "llmkernels: " << __VA_ARGS__;                                    \
      throw std::runtime_error(llmk_msg_.str());                                     \
    }                                                                                \
  } while (0)
