// The medseg command: parses options into config structs, calls pipelines/, maps errors to exit codes.
#include "app/commands.hpp"

int main(int argc, char** argv) { return medseg::app::run(argc, argv); }
