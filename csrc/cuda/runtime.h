// What the CUDA part of the build can see at run time (device count, runtime version).
#pragma once
#include <string>
#include <vector>

namespace llmk {
namespace cuda {

int runtime_version();  // e.g. 13000; 0 if unknown
int driver_version();   // 0 when no driver is installed
int device_count();     // 0 when no GPU or no driver
std::vector<std::string> device_names();

}  // namespace cuda
}  // namespace llmk
