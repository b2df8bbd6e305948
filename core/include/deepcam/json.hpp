// A JSON value as the MLPerf log needs it, written the way Python's json.dumps
// writes it (the checker parses the log with Python): numbers in their
// shortest round-trip form, NaN and Infinity as bare words, strings escaped.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "deepcam/export.hpp"

namespace deepcam {

class DEEPCAM_API Json {
 public:
  enum class Kind { Null, Bool, Int, Float, String, List, Object };

  Json() = default;
  Json(bool v) : kind_(Kind::Bool), b_(v) {}  // NOLINT: implicit on purpose
  Json(int v) : kind_(Kind::Int), i_(v) {}
  Json(long v) : kind_(Kind::Int), i_(v) {}
  Json(long long v) : kind_(Kind::Int), i_(v) {}
  Json(unsigned v) : kind_(Kind::Int), i_(v) {}
  Json(unsigned long v) : Json(static_cast<unsigned long long>(v)) {}
  // Above int64's range it is refused: it would be written as a negative number.
  Json(unsigned long long v) : kind_(Kind::Int), i_(checked_int64(v)) {}
  Json(double v) : kind_(Kind::Float), d_(v) {}
  Json(const char* v) : kind_(Kind::String), s_(v) {}
  Json(std::string v) : kind_(Kind::String), s_(std::move(v)) {}
  Json(std::vector<Json> v) : kind_(Kind::List), list_(std::move(v)) {}
  static Json list(std::vector<Json> items) { return Json(std::move(items)); }
  static Json object(std::vector<std::pair<std::string, Json>> members);

  Kind kind() const { return kind_; }
  std::string dump() const;

 private:
  static std::int64_t checked_int64(unsigned long long v) {
    if (v > static_cast<unsigned long long>(INT64_MAX)) {
      throw std::out_of_range("deepcam::Json: " + std::to_string(v) + " is beyond int64, which a Json integer holds");
    }
    return static_cast<std::int64_t>(v);
  }

  Kind kind_ = Kind::Null;
  bool b_ = false;
  std::int64_t i_ = 0;
  double d_ = 0.0;
  std::string s_;
  std::vector<Json> list_;
  std::vector<std::pair<std::string, Json>> members_;
};

// Python's repr(float): shortest digits that round-trip, fixed notation for
// decimal exponents in [-4, 16), else d.ddde+XX; always a '.' or an 'e'.
DEEPCAM_API std::string python_float_repr(double value);

// `text` as it is safe to print on a terminal: each control character (an
// ESC that starts a sequence which clears the screen, a carriage return,
// a C1 control such as U+009B, which terminals read as ESC [) as \xNN per
// byte, and a line break too when `one_line` (a report's line per problem,
// whose file name holds one). Messages name files as they are; a name may
// hold anything but '/' and NUL.
DEEPCAM_API std::string shown(const std::string& text, bool one_line);

// The first control character of `text` (a tab aside; a C1 control such
// as U+009B, which terminals read as ESC [, too), as a problem ("holds the
// control character 0x0a at byte 5"), or "".
DEEPCAM_API std::string control_character(std::string_view text);

// Where `text` stops being UTF-8 ("byte 12 is 0xff", "byte 12 begins a
// sequence cut short", "bytes 12..14" for an overlong form, a UTF-16
// surrogate or a code point past U+10FFFF; bytes count from 1), or "" when
// it is UTF-8 throughout.
DEEPCAM_API std::string utf8_problem(std::string_view text);

}  // namespace deepcam
