// The thread count for every CPU kernel (ours and oneDNN's; both use the OpenMP runtime).
#pragma once

namespace medseg {
// n <= 0 selects all hardware threads.
void set_num_threads(int n);
int num_threads();
}  // namespace medseg
