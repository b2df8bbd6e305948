// Unit test of deepcam::schedulers::CosineAnnealing: against the reference's
// LR sequences in testdata/lr_schedules.json (SPEC 6.4), against PyTorch's
// own CosineAnnealingLR over many periods (run by test_paths.hpp's Python), and
// lr_at as a function of the step alone, whatever order it is asked in.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "cosine_annealing.hpp"
#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "mini_json.hpp"
#include "mlperf_log_lines.hpp"
#include "test_paths.hpp"

using deepcam::schedulers::CosineAnnealing;
using deepcam::schedulers::CosineAnnealingOptions;
using test_support::log_lines;

namespace {

void check_relative(double actual, double expected, const std::string& what) {
  INFO(what << ": got " << actual << ", expected " << expected);
  if (expected == 0.0) {
    CHECK(actual == 0.0);
  } else {
    CHECK(std::abs(actual - expected) <= 1e-9 * std::abs(expected));
  }
}

CosineAnnealingOptions options_of(const testjson::Value& config) {
  CosineAnnealingOptions options;
  options.t_max = static_cast<std::int64_t>(config["t_max"].number);
  options.eta_min = config["eta_min"].number;
  if (config.has("lr_warmup_steps")) options.lr_warmup_steps = static_cast<std::int64_t>(config["lr_warmup_steps"].number);
  if (config.has("lr_warmup_factor")) options.lr_warmup_factor = config["lr_warmup_factor"].number;
  return options;
}

// PyTorch's CosineAnnealingLR with base LR `base`, started from `start` (the
// LR a warmup hands over, set on the group as the reference's warmup does),
// stepped `steps` - 1 times; one LR per line, repr'd.
std::vector<double> pytorch_cosine(double base, double start, std::int64_t t_max, double eta_min, int steps) {
  std::ostringstream script;
  script.precision(17);
  script << "import torch\n"
            "p = torch.nn.Parameter(torch.zeros(1))\n"
            "o = torch.optim.SGD([p], lr="
         << base << ")\ns = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=" << t_max
         << ", eta_min=" << eta_min << ")\no.param_groups[0]['lr'] = " << start
         << "\nfor i in range(" << steps
         << "):\n"
            "    print(repr(o.param_groups[0]['lr']))\n"
            "    o.step()\n"
            "    s.step()\n";
  const std::string command = "'" + test_support::python() + "' -c \"" + script.str() + "\"";
  std::FILE* pipe = popen(command.c_str(), "r");
  REQUIRE_MESSAGE(pipe != nullptr, "cannot run " << command);
  std::vector<double> lrs;
  char line[128];
  while (std::fgets(line, sizeof line, pipe)) lrs.push_back(std::strtod(line, nullptr));
  const int status = pclose(pipe);
  REQUIRE_MESSAGE(status == 0, command << " failed (status " << status
                                       << "); is the project venv with torch installed?");
  REQUIRE(static_cast<int>(lrs.size()) == steps);
  return lrs;
}

}  // namespace

TEST_CASE("CosineAnnealing reproduces every cosine sequence of lr_schedules.json") {
  const testjson::Value cases = testjson::parse_file((test_support::testdata_dir() / "lr_schedules.json").string());
  int checked = 0;
  for (const testjson::Value& c : cases.array) {
    const testjson::Value& config = c["config"];
    if (config["type"].string != "cosine_annealing") continue;
    ++checked;
    const std::string name = "case " + std::to_string(checked);
    const std::vector<double> lrs = c["lr"].numbers();
    REQUIRE(static_cast<double>(lrs.size()) == c["steps"].number);
    CosineAnnealing forward(config["start_lr"].number, options_of(config));
    for (std::size_t s = 0; s < lrs.size(); ++s) {
      check_relative(forward.lr_at(static_cast<std::int64_t>(s)), lrs[s], name + " step " + std::to_string(s));
    }
    // The same object asked backwards, and a fresh one asked out of order,
    // give the same values: lr_at depends on the step only.
    for (std::size_t s = lrs.size(); s-- > 0;) {
      check_relative(forward.lr_at(static_cast<std::int64_t>(s)), lrs[s],
                     name + " step " + std::to_string(s) + " (reversed)");
    }
    CosineAnnealing fresh(config["start_lr"].number, options_of(config));
    for (std::size_t s : {39u, 7u, 21u, 0u, 38u, 5u, 6u}) {
      check_relative(fresh.lr_at(static_cast<std::int64_t>(s)), lrs[s], name + " step " + std::to_string(s) + " (fresh)");
    }
  }
  CHECK(checked == 2);
}

TEST_CASE("CosineAnnealing follows PyTorch's recursion over several periods") {
  // 3000 steps cross T_max = 700 four times, and the saved points every 1024
  // steps; the second case starts from a warmup's last LR (0.0036 = L * 0.9)
  // as the reference hands it over.
  struct Case {
    CosineAnnealingOptions options;
    double start;
  };
  const double base = 0.004;
  const Case cases[] = {{{700, 1e-5, 0, 1.0}, base}, {{700, 1e-5, 10, 1.0}, base * (9.0 / 10.0)}};
  for (const Case& c : cases) {
    const int steps = 3000;
    const std::vector<double> expected = pytorch_cosine(base, c.start, c.options.t_max, c.options.eta_min, steps);
    CosineAnnealing scheduler(base, c.options);
    const std::int64_t w = c.options.lr_warmup_steps;
    if (w > 0) CHECK(scheduler.lr_at(w - 1) == c.start);
    for (int e = 0; e < steps; ++e) {
      check_relative(scheduler.lr_at(w + e), expected[static_cast<std::size_t>(e)], "cosine step " + std::to_string(e));
    }
  }
}

TEST_CASE("CosineAnnealing gives bit-identical LRs whatever the order of the steps asked") {
  const CosineAnnealingOptions options{50, 1e-4, 3, 2.0};
  CosineAnnealing in_order(0.01, options);
  std::vector<double> lrs;
  for (std::int64_t s = 0; s < 5000; ++s) lrs.push_back(in_order.lr_at(s));
  // Jumps forward past saved points, back below them, and onto them, as a
  // resumed run or a second pass asks.
  CosineAnnealing jumping(0.01, options);
  for (std::int64_t s : {4999, 1, 1026, 1027, 1024, 2050, 0, 4000, 3, 2, 3000, 4999}) {
    INFO("step " << s);
    CHECK(jumping.lr_at(s) == lrs[static_cast<std::size_t>(s)]);
  }
  CHECK_THROWS_AS(jumping.lr_at(-1), deepcam::Error);
}

TEST_CASE("CosineAnnealing edge cases of SPEC 6.2 and 6.3") {
  SUBCASE("t_max = 1 alternates between L and eta_min") {
    CosineAnnealing scheduler(1.0, CosineAnnealingOptions{1, 0.25, 0, 1.0});
    CHECK(scheduler.lr_at(0) == 1.0);
    CHECK(scheduler.lr_at(1) == doctest::Approx(0.25).epsilon(1e-15));
    CHECK(scheduler.lr_at(2) == doctest::Approx(1.0).epsilon(1e-15));
    CHECK(scheduler.lr_at(3) == doctest::Approx(0.25).epsilon(1e-15));
  }
  SUBCASE("warmup with F = 1 starts at 0 and holds the value of step W - 1 at W") {
    CosineAnnealing scheduler(1.0, CosineAnnealingOptions{4, 0.0, 4, 1.0});
    CHECK(scheduler.lr_at(0) == 0.0);
    CHECK(scheduler.lr_at(3) == 0.75);
    CHECK(scheduler.lr_at(4) == 0.75);
    // The first cosine step scales the distance to eta_min by
    // (1 + cos(pi/4)) / 2: the base LR only sets the period's amplitude.
    CHECK(scheduler.lr_at(5) == doctest::Approx(0.75 * (1 + std::cos(M_PI / 4)) / 2).epsilon(1e-14));
  }
  SUBCASE("eta_min above L is allowed, as PyTorch allows it: the LR rises") {
    CosineAnnealing scheduler(0.1, CosineAnnealingOptions{10, 0.2, 0, 1.0});
    CHECK(scheduler.lr_at(10) == doctest::Approx(0.2).epsilon(1e-12));
    CHECK(scheduler.lr_at(5) > 0.1);
  }
  SUBCASE("t_max < 1 is refused") {
    CHECK_THROWS_AS(CosineAnnealing(0.1, CosineAnnealingOptions{0, 0.0, 0, 1.0}), deepcam::Error);
  }
}

TEST_CASE("CosineAnnealing logs the scheduler_* keys of SPEC 6.4 with the checker's types") {
  const CosineAnnealing scheduler(1e-3, CosineAnnealingOptions{4000, 0.0, 400, 1.0});
  const std::vector<std::string> lines =
      log_lines([&](deepcam::MlperfLog& log) { scheduler.log_hyperparameters(log); });
  // hpc_3.0.0/closed_deepcam_cosine_annealing.yaml: t_max >= 1, eta_min >= 0.
  const std::vector<std::string> expected = {
      R"("key":"scheduler_type","value":"cosine_annealing")", R"("key":"scheduler_t_max","value":4000,)",
      R"("key":"scheduler_eta_min","value":0.0,)", R"("key":"scheduler_lr_warmup_steps","value":400,)",
      R"("key":"scheduler_lr_warmup_factor","value":1.0,)"};
  REQUIRE(lines.size() == expected.size());
  for (std::size_t i = 0; i < lines.size(); ++i) {
    INFO(lines[i]);
    CHECK(lines[i].rfind(":::MLLOG{", 0) == 0);
    CHECK(lines[i].find(expected[i]) != std::string::npos);
  }
}

TEST_CASE("CosineAnnealingOptions checks every bound and names the key") {
  using deepcam::ParamValue;
  auto params = [](std::int64_t t_max, double eta_min, std::int64_t steps, double factor) {
    return deepcam::Params("run.toml [scheduler]", {{"t_max", ParamValue(t_max)},
                                                    {"eta_min", ParamValue(eta_min)},
                                                    {"lr_warmup_steps", ParamValue(steps)},
                                                    {"lr_warmup_factor", ParamValue(factor)}});
  };
  const CosineAnnealingOptions ok = CosineAnnealingOptions::from(params(20, 1e-5, 4, 2.0));
  CHECK(ok.t_max == 20);
  CHECK(ok.eta_min == 1e-5);
  CHECK(ok.lr_warmup_steps == 4);
  CHECK(ok.lr_warmup_factor == 2.0);
  CHECK_THROWS_WITH_AS(CosineAnnealingOptions::from(params(0, 0.0, 0, 1.0)),
                       doctest::Contains("run.toml [scheduler] t_max"), deepcam::Error);
  CHECK_THROWS_WITH_AS(CosineAnnealingOptions::from(params(5, -1.0, 0, 1.0)),
                       doctest::Contains("run.toml [scheduler] eta_min"), deepcam::Error);
  CHECK_THROWS_WITH_AS(CosineAnnealingOptions::from(params(5, 0.0, -1, 1.0)),
                       doctest::Contains("run.toml [scheduler] lr_warmup_steps"), deepcam::Error);
  CHECK_THROWS_WITH_AS(CosineAnnealingOptions::from(params(5, 0.0, 0, 0.5)),
                       doctest::Contains("run.toml [scheduler] lr_warmup_factor"), deepcam::Error);
  // A factor with no warm-up to apply it to is refused, not logged as if in effect.
  CHECK_THROWS_WITH_AS(CosineAnnealingOptions::from(params(5, 0.0, 0, 4.0)),
                       doctest::Contains("lr_warmup_factor = 4.0: has no effect without a warm-up"), deepcam::Error);
}
