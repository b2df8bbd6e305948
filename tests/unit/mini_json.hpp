// A small JSON reader for the test vectors in ../shared/testdata: objects,
// arrays, numbers, strings, true/false/null. Tests only; throws on bad input.
#pragma once

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace testjson {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  const Value& operator[](const std::string& key) const {
    auto it = object.find(key);
    if (it == object.end()) throw std::runtime_error("json: no key " + key);
    return it->second;
  }
  const Value& operator[](std::size_t i) const { return array.at(i); }
  bool has(const std::string& key) const { return object.count(key) != 0; }
  std::vector<double> numbers() const {
    std::vector<double> out;
    for (const auto& v : array) out.push_back(v.number);
    return out;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}
  Value parse() {
    Value v = value();
    skip();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  void skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  [[noreturn]] void fail(const char* what) { throw std::runtime_error(std::string("json: ") + what); }
  bool eat(const char* word) {
    const std::string w(word);
    if (s_.compare(i_, w.size(), w) == 0) {
      i_ += w.size();
      return true;
    }
    return false;
  }
  Value value() {
    skip();
    if (i_ >= s_.size()) fail("unexpected end");
    Value v;
    const char c = s_[i_];
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++i_;
      skip();
      if (s_[i_] == '}') { ++i_; return v; }
      while (true) {
        skip();
        std::string key = str();
        skip();
        if (s_[i_++] != ':') fail("expected ':'");
        v.object[key] = value();
        skip();
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_] == '}') { ++i_; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Value::Kind::Array;
      ++i_;
      skip();
      if (s_[i_] == ']') { ++i_; return v; }
      while (true) {
        v.array.push_back(value());
        skip();
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_] == ']') { ++i_; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Value::Kind::String;
      v.string = str();
      return v;
    }
    if (eat("true")) { v.kind = Value::Kind::Bool; v.boolean = true; return v; }
    if (eat("false")) { v.kind = Value::Kind::Bool; return v; }
    if (eat("null")) return v;
    if (eat("NaN")) { v.kind = Value::Kind::Number; v.number = std::nan(""); return v; }
    char* end = nullptr;
    v.kind = Value::Kind::Number;
    v.number = std::strtod(s_.c_str() + i_, &end);
    if (end == s_.c_str() + i_) fail("bad value");
    i_ = static_cast<std::size_t>(end - s_.c_str());
    return v;
  }
  std::string str() {
    if (s_[i_] != '"') fail("expected string");
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        ++i_;
        const char e = s_[i_];
        out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
      } else {
        out += s_[i_];
      }
      ++i_;
    }
    ++i_;
    return out;
  }
  const std::string& s_;
  std::size_t i_ = 0;
};

inline Value parse_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  return Parser(text).parse();
}

}  // namespace testjson
