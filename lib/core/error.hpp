// Error hierarchy and checks. Libraries throw; only app/ maps exceptions to messages and exit codes.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace medseg {

// Base of every medseg error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A file could not be read or written, or its content is malformed. Messages name the file.
class IoError : public Error {
 public:
  using Error::Error;
};
// Wrong shapes, bad arguments, bad options, invalid datasets (user-correctable input problems).
class ArgumentError : public Error {
 public:
  using Error::Error;
};
// Non-finite values where finite ones are required, divergence.
class NumericError : public Error {
 public:
  using Error::Error;
};
// A CUDA / cuDNN call failed, or a device was requested that is not usable.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace detail {
inline void append_values(std::ostringstream&) {}
template <typename T, typename... R>
void append_values(std::ostringstream& os, const T& v, const R&... rest) {
  os << v;
  append_values(os, rest...);
}
}  // namespace detail

// Builds "file:line: check `expr` failed: <message>".
template <typename... Args>
std::string check_message(const char* file, int line, const char* expr, const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": check `" << expr << "` failed";
  if constexpr (sizeof...(args) > 0) {
    os << ": ";
    detail::append_values(os, args...);
  }
  return os.str();
}

}  // namespace medseg

// MEDSEG_CHECK(cond, values...) throws ArgumentError with file:line, the expression and the values.
#define MEDSEG_CHECK(cond, ...)                                                                 \
  do {                                                                                          \
    if (!(cond))                                                                                \
      throw ::medseg::ArgumentError(                                                           \
          ::medseg::check_message(__FILE__, __LINE__, #cond __VA_OPT__(, ) __VA_ARGS__));       \
  } while (0)

// Same, with a chosen exception type.
#define MEDSEG_CHECK_T(ExcType, cond, ...)                                                      \
  do {                                                                                          \
    if (!(cond))                                                                                \
      throw ExcType(::medseg::check_message(__FILE__, __LINE__, #cond __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
