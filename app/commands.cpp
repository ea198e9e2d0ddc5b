#include "app/commands.hpp"

#include <iostream>

namespace medseg::app {
int run(int, char**) {
  std::cout << "medseg\n";
  return 0;
}
}  // namespace medseg::app
