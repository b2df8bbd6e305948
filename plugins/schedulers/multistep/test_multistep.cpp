// Unit test of deepcam::schedulers::Multistep against the reference's LR
// sequences in testdata/lr_schedules.json (SPEC 6.4).
#include <doctest/doctest.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "mlperf_log_lines.hpp"
#include "multistep.hpp"
#include "test_paths.hpp"

using deepcam::schedulers::Multistep;
using deepcam::schedulers::MultistepOptions;
using test_support::log_lines;

namespace {

// Just enough JSON for lr_schedules.json: objects, arrays, numbers, strings
// without escapes.
struct Value {
  std::string text;  // a string, or a number's literal
  double number = 0.0;
  std::vector<Value> items;
  std::map<std::string, Value> members;

  const Value& operator[](const std::string& key) const {
    const auto found = members.find(key);
    REQUIRE_MESSAGE(found != members.end(), "lr_schedules.json: no key " << key);
    return found->second;
  }
  bool has(const std::string& key) const { return members.count(key) != 0; }
};

class Reader {
 public:
  explicit Reader(std::string text) : text_(std::move(text)) {}

  Value parse() {
    skip();
    Value value;
    const char c = peek();
    if (c == '{') {
      ++pos_;
      while (skip(), peek() != '}') {
        const std::string key = parse().text;
        skip();
        expect(':');
        value.members[key] = parse();
        skip();
        if (peek() == ',') ++pos_;
      }
      ++pos_;
    } else if (c == '[') {
      ++pos_;
      while (skip(), peek() != ']') {
        value.items.push_back(parse());
        skip();
        if (peek() == ',') ++pos_;
      }
      ++pos_;
    } else if (c == '"') {
      const std::size_t end = text_.find('"', pos_ + 1);
      REQUIRE(end != std::string::npos);
      value.text = text_.substr(pos_ + 1, end - pos_ - 1);
      pos_ = end + 1;
    } else {
      const char* begin = text_.c_str() + pos_;
      char* end = nullptr;
      value.number = std::strtod(begin, &end);
      REQUIRE_MESSAGE(end != begin, "lr_schedules.json: unexpected '" << c << "' at " << pos_);
      value.text.assign(begin, static_cast<std::size_t>(end - begin));
      pos_ += static_cast<std::size_t>(end - begin);
    }
    return value;
  }

 private:
  char peek() const {
    REQUIRE(pos_ < text_.size());
    return text_[pos_];
  }
  void skip() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  void expect(char c) {
    REQUIRE(peek() == c);
    ++pos_;
  }
  std::string text_;
  std::size_t pos_ = 0;
};

Value load_schedules() {
  const std::string path = (test_support::testdata_dir() / "lr_schedules.json").string();
  std::ifstream in(path);
  REQUIRE_MESSAGE(in.good(), "cannot read " << path);
  std::stringstream text;
  text << in.rdbuf();
  return Reader(text.str()).parse();
}

MultistepOptions options_of(const Value& config) {
  MultistepOptions options;
  for (const Value& m : config["milestones"].items) options.milestones.push_back(static_cast<std::int64_t>(m.number));
  options.decay_rate = config["decay_rate"].number;
  if (config.has("lr_warmup_steps")) options.lr_warmup_steps = static_cast<std::int64_t>(config["lr_warmup_steps"].number);
  if (config.has("lr_warmup_factor")) options.lr_warmup_factor = config["lr_warmup_factor"].number;
  return options;
}

void check_relative(double actual, double expected, const std::string& what) {
  INFO(what << ": got " << actual << ", expected " << expected);
  if (expected == 0.0) {
    CHECK(actual == 0.0);
  } else {
    CHECK(std::abs(actual - expected) <= 1e-9 * std::abs(expected));
  }
}

}  // namespace

TEST_CASE("Multistep reproduces every multistep sequence of lr_schedules.json") {
  const Value cases = load_schedules();
  int checked = 0;
  for (const Value& c : cases.items) {
    const Value& config = c["config"];
    if (config["type"].text != "multistep") continue;
    ++checked;
    Multistep scheduler(config["start_lr"].number, options_of(config));
    const std::vector<Value>& lrs = c["lr"].items;
    REQUIRE(static_cast<double>(lrs.size()) == c["steps"].number);
    for (std::size_t s = 0; s < lrs.size(); ++s) {
      check_relative(scheduler.lr_at(static_cast<std::int64_t>(s)), lrs[s].number,
                     "case " + std::to_string(checked) + " step " + std::to_string(s));
    }
    // A pure function of the step: backwards gives the same values.
    for (std::size_t s = lrs.size(); s-- > 0;) {
      check_relative(scheduler.lr_at(static_cast<std::int64_t>(s)), lrs[s].number,
                     "case " + std::to_string(checked) + " step " + std::to_string(s) + " (reversed)");
    }
  }
  CHECK(checked == 3);
}

TEST_CASE("Multistep decays one multiplication at a time, as PyTorch does") {
  // 0.001 * 0.1 * 0.1 is 1e-05 in double, 0.001 * 0.1**2 is not.
  Multistep scheduler(0.001, MultistepOptions{{5, 12}, 0.1, 0, 1.0});
  CHECK(scheduler.lr_at(12) == 0.001 * 0.1 * 0.1);
  CHECK(scheduler.lr_at(39) == 1e-05);
}

TEST_CASE("Multistep edge cases of SPEC 6.1 and 6.3") {
  SUBCASE("no milestones, no warmup: constant") {
    Multistep scheduler(0.5, MultistepOptions{});
    CHECK(scheduler.lr_at(0) == 0.5);
    CHECK(scheduler.lr_at(1000000) == 0.5);
  }
  SUBCASE("milestone 0 without warmup applies at the first step") {
    Multistep scheduler(1.0, MultistepOptions{{0}, 0.5, 0, 1.0});
    CHECK(scheduler.lr_at(0) == 0.5);
  }
  SUBCASE("a repeated milestone applies r once per listing") {
    Multistep scheduler(1.0, MultistepOptions{{3, 3}, 0.5, 0, 1.0});
    CHECK(scheduler.lr_at(2) == 1.0);
    CHECK(scheduler.lr_at(3) == 0.25);
  }
  SUBCASE("with warmup, a milestone m applies at m + W + 1") {
    Multistep scheduler(1.0, MultistepOptions{{0, 2}, 0.5, 2, 1.0});
    CHECK(scheduler.lr_at(0) == 0.0);
    CHECK(scheduler.lr_at(1) == 0.5);
    CHECK(scheduler.lr_at(2) == 0.5);  // stays at the value of step W - 1
    CHECK(scheduler.lr_at(3) == 0.25);
    CHECK(scheduler.lr_at(4) == 0.25);
    CHECK(scheduler.lr_at(5) == 0.125);
  }
  SUBCASE("negative steps are refused") {
    Multistep scheduler(1.0, MultistepOptions{});
    CHECK_THROWS_AS(scheduler.lr_at(-1), deepcam::Error);
  }
}

TEST_CASE("Multistep logs the scheduler_* keys of SPEC 6.4") {
  const Multistep scheduler(1e-3, MultistepOptions{{5, 12}, 0.5, 4, 2.0});
  const std::vector<std::string> lines =
      log_lines([&](deepcam::MlperfLog& log) { scheduler.log_hyperparameters(log); });
  const std::vector<std::string> expected = {
      R"("key":"scheduler_type","value":"multistep")",
      R"("key":"scheduler_milestones","value":[5,12])",
      R"("key":"scheduler_decay_rate","value":0.5)",
      R"("key":"scheduler_lr_warmup_steps","value":4)",
      R"("key":"scheduler_lr_warmup_factor","value":2.0)"};
  REQUIRE(lines.size() == expected.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    INFO(lines[i]);
    CHECK(lines[i].rfind(":::MLLOG{", 0) == 0);
    CHECK(lines[i].find(expected[i]) != std::string::npos);
  }
}

TEST_CASE("MultistepOptions checks what the schema cannot") {
  using deepcam::ParamValue;
  auto params = [](std::vector<std::int64_t> milestones, double rate, std::int64_t steps, double factor) {
    return deepcam::Params("run.toml [scheduler]", {{"milestones", ParamValue(std::move(milestones))},
                                                    {"decay_rate", ParamValue(rate)},
                                                    {"lr_warmup_steps", ParamValue(steps)},
                                                    {"lr_warmup_factor", ParamValue(factor)}});
  };
  const MultistepOptions ok = MultistepOptions::from(params({3, 1}, 0.5, 2, 1.5));
  CHECK(ok.milestones == std::vector<std::int64_t>{3, 1});
  CHECK(ok.decay_rate == 0.5);
  CHECK(ok.lr_warmup_steps == 2);
  CHECK(ok.lr_warmup_factor == 1.5);
  CHECK_THROWS_WITH_AS(MultistepOptions::from(params({}, 0.0, 0, 1.0)),
                       doctest::Contains("run.toml [scheduler] decay_rate"), deepcam::Error);
  CHECK_THROWS_WITH_AS(MultistepOptions::from(params({-1}, 0.1, 0, 1.0)),
                       doctest::Contains("run.toml [scheduler] milestones"), deepcam::Error);
  CHECK_THROWS_WITH_AS(MultistepOptions::from(params({}, 0.1, -2, 1.0)),
                       doctest::Contains("lr_warmup_steps"), deepcam::Error);
  CHECK_THROWS_WITH_AS(MultistepOptions::from(params({}, 0.1, 0, 0.5)),
                       doctest::Contains("lr_warmup_factor"), deepcam::Error);
  // A factor with no warm-up to apply it to is refused, not logged as if in effect.
  CHECK_THROWS_WITH_AS(MultistepOptions::from(params({}, 0.1, 0, 4.0)),
                       doctest::Contains("lr_warmup_factor = 4.0: has no effect without a warm-up"), deepcam::Error);
}
