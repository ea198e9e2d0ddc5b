#include <gtest/gtest.h>

#include "core/threads.hpp"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  medseg::set_num_threads(0);
  return RUN_ALL_TESTS();
}
