#pragma once

namespace medseg::app {
// Exit codes: 0 ok, 1 runtime failure (IO, numeric, CUDA), 2 usage or invalid input.
int run(int argc, char** argv);
}  // namespace medseg::app
