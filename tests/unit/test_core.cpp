// Unit tests of the core library: JSON as Python writes it, the MLPerf line
// format, TOML checking against a schema, and the loss and IoU of SPEC 4
// against the reference's vectors.
// LibTorch first: its glog-style CHECK macro must be replaced by doctest's.
#include <torch/types.h>
#undef CHECK
#include <doctest/doctest.h>

#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <thread>

#include "deepcam/config.hpp"
#include "deepcam/engine.hpp"
#include "deepcam/error.hpp"
#include "deepcam/json.hpp"
#include "deepcam/loss.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/stop_request.hpp"
#include "deepcam/warmup.hpp"
#include "mini_json.hpp"
#include "test_paths.hpp"

using deepcam::Json;
using deepcam::python_float_repr;

TEST_CASE("floats are written as Python's repr writes them") {
  CHECK(python_float_repr(0.001) == "0.001");
  CHECK(python_float_repr(1e-05) == "1e-05");
  CHECK(python_float_repr(0.0001) == "0.0001");
  CHECK(python_float_repr(3.0) == "3.0");
  CHECK(python_float_repr(-2.5) == "-2.5");
  CHECK(python_float_repr(1e16) == "1e+16");
  CHECK(python_float_repr(123456789012345.0) == "123456789012345.0");
  CHECK(python_float_repr(0.1 + 0.2) == "0.30000000000000004");
  CHECK(python_float_repr(0.00030000000000000003) == "0.00030000000000000003");
  CHECK(python_float_repr(3.0000000000000004e-05) == "3.0000000000000004e-05");
  CHECK(python_float_repr(1.5e300) == "1.5e+300");
  CHECK(python_float_repr(0.0) == "0.0");
  CHECK(python_float_repr(std::nan("")) == "NaN");
  CHECK(python_float_repr(-INFINITY) == "-Infinity");
}

TEST_CASE("JSON values are written as json.dumps writes them") {
  CHECK(Json(true).dump() == "true");
  CHECK(Json(42).dump() == "42");
  CHECK(Json("a\"b\\c\n\x01").dump() == "\"a\\\"b\\\\c\\n\\u0001\"");
  CHECK(Json("\xc3\xa9").dump() == "\"\\u00e9\"");
  CHECK(Json("a\x7f").dump() == "\"a\\u007f\"");  // DEL too: json.dumps writes only ' ' .. '~' as they are
  CHECK(Json::list({Json(0.9), Json(0.999)}).dump() == "[0.9, 0.999]");
  CHECK(Json::object({{"a", Json(1)}, {"b", Json()}}).dump() == "{\"a\": 1, \"b\": null}");
}

TEST_CASE("JSON integers come from every integer type, and one beyond int64 is refused") {
  // unsigned and unsigned long long did not compile (an ambiguous conversion); a uint64 above int64's
  // range was written as a negative number.
  CHECK(Json(7u).dump() == "7");
  CHECK(Json(std::uint32_t{4000000000u}).dump() == "4000000000");
  CHECK(Json(std::uint64_t{9223372036854775807u}).dump() == "9223372036854775807");
  CHECK(Json(9223372036854775807ull).dump() == "9223372036854775807");
  CHECK(Json(std::size_t{12}).dump() == "12");
  CHECK(Json(std::int64_t{-3}).dump() == "-3");
  CHECK_THROWS_AS(Json(std::uint64_t{9223372036854775808u}), std::out_of_range);
  CHECK_THROWS_AS(Json(18446744073709551615ull), std::out_of_range);
}

TEST_CASE("the warmup's learning rates are the reference's to the bit") {
  // The reference multiplies the step by the slope 1 / W; dividing by W differs in the last place
  // for some steps (these values are Python's for L * (s * (1 / W)) with L = 0.001, W = 10).
  const deepcam::Warmup warmup{10, 1.0};
  CHECK(deepcam::warmup_lr(0.001, warmup, 3) == 0.00030000000000000003);
  CHECK(deepcam::warmup_lr(0.001, warmup, 6) == 0.0006000000000000001);
  CHECK(deepcam::warmup_lr(0.001, warmup, 7) == 0.0007000000000000001);
  // With a factor: L * ((F - 1) * s * (1 / W) + 1), L = 0.004, F = 3.
  CHECK(deepcam::warmup_lr(0.004, deepcam::Warmup{10, 3.0}, 7) == 0.009600000000000001);
}

TEST_CASE("an MLPerf line holds the keys in order with the call site") {
  std::FILE* f = std::tmpfile();
  REQUIRE(f);
  deepcam::MlperfLog log(f, true);
  log.event("opt_lr", Json(0.001), {{"epoch_num", Json(1)}});
  std::rewind(f);
  char buf[512] = {};
  REQUIRE(std::fgets(buf, sizeof buf, f));
  const std::string line(buf);
  CHECK(line.rfind(":::MLLOG {\"namespace\": \"\", \"time_ms\": ", 0) == 0);
  CHECK(line.find("\"event_type\": \"POINT_IN_TIME\", \"key\": \"opt_lr\", \"value\": 0.001, \"metadata\": "
                  "{\"file\": ") != std::string::npos);
  CHECK(line.find("test_core.cpp\", \"lineno\": ") != std::string::npos);
  CHECK(line.find("\"epoch_num\": 1}}") != std::string::npos);
  std::fclose(f);

  deepcam::MlperfLog silent(nullptr, false);
  silent.event("x", Json(1));  // other ranks: accepted, nothing written
  CHECK_FALSE(silent.enabled());
}

TEST_CASE("an MLPerf line refuses metadata that would replace its call site or repeat a key") {
  // Python's json takes a repeated key's last value: a plugin's "file" replaced the call site in what the
  // checker read.
  std::FILE* f = std::tmpfile();
  REQUIRE(f);
  deepcam::MlperfLog log(f, true);
  deepcam::MlperfLog silent(nullptr, false);  // every rank refuses alike
  for (deepcam::MlperfLog* l : {&log, &silent}) {
    CHECK_THROWS_WITH_AS(l->event("opt_lr", Json(0.1), {{"file", Json("spoof.cpp")}}),
                         doctest::Contains("the MLPerf log line of 'opt_lr' (from "), std::logic_error);
    CHECK_THROWS_WITH_AS(l->event("opt_lr", Json(0.1), {{"lineno", Json(1)}}),
                         doctest::Contains("is given the metadata 'lineno' (the log sets file and lineno itself)"),
                         std::logic_error);
    CHECK_THROWS_WITH_AS(l->start("epoch_start", Json(), {{"epoch_num", Json(1)}, {"epoch_num", Json(2)}}),
                         doctest::Contains("is given the metadata 'epoch_num' twice"), std::logic_error);
  }
  // The refused epoch_start opened no interval: a failed run closes none.
  CHECK(log.close_open_intervals(Json(3)).kind() == Json::Kind::Null);
  CHECK(std::ftell(f) == 0);  // nothing written
  std::fclose(f);
}

TEST_CASE("an MLPerf setting logged twice before run_start is refused, after it events repeat freely") {
  // A scheduler plugin logging global_batch_size again gave a log the open-division checker passed, with
  // two values for one setting.
  std::FILE* f = std::tmpfile();
  REQUIRE(f);
  deepcam::MlperfLog log(f, true);
  deepcam::MlperfLog silent(nullptr, false);  // every rank refuses alike
  for (deepcam::MlperfLog* l : {&log, &silent}) {
    l->event("global_batch_size", Json(8), {}, deepcam::CallSite{"core/train/engine.cpp", 535});
    l->event("opt_name", Json("lamb"));
    const long written = std::ftell(f);
    CHECK_THROWS_WITH_AS(l->event("global_batch_size", Json(16), {}, deepcam::CallSite{"plugin.cpp", 7}),
                         "the MLPerf log line of 'global_batch_size' (from plugin.cpp:7) repeats a setting logged "
                         "before run_start (from core/train/engine.cpp:535); each is logged once",
                         std::logic_error);
    CHECK(std::ftell(f) == written);  // the second value is not in the log
    l->start("run_start");
    l->event("learning_rate", Json(0.1));
    l->event("learning_rate", Json(0.2));
    l->event("global_batch_size", Json(8));  // the settings' rule ends at run_start
  }
  std::fclose(f);
}

namespace {
std::string write_toml(const std::string& text) {
  static int n = 0;
  const std::string path = "/tmp/deepcam_test_core_" + std::to_string(::getpid()) + "_" + std::to_string(n++) + ".toml";
  std::ofstream(path) << text;
  return path;
}
const deepcam::ParamSpec kSpecs[] = {
    {"lr", deepcam::ParamType::Float, "0.001", "learning rate", 0.0, 10.0},
    {"milestones", deepcam::ParamType::IntList, "[]", "steps", 0, 1e9},
    {"mode", deepcam::ParamType::String, "\"a\"", "mode", 1, 0, "a|b"},
};
const deepcam::ParamSchema kSchema{kSpecs, 3};
std::string error_of(const std::string& toml) {
  try {
    deepcam::check_table_file(write_toml(toml), "optimizer", kSchema);
  } catch (const deepcam::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("a table is checked against its schema, defaults filled in") {
  const auto p = deepcam::check_table_file(write_toml("[optimizer]\nname = \"x\"\nlr = 2\nmilestones = [3, 4]\n"),
                                           "optimizer", kSchema);
  CHECK(p.number("lr") == 2.0);
  CHECK(p.integers("milestones") == std::vector<std::int64_t>{3, 4});
  CHECK(p.string("mode") == "a");
  CHECK_THROWS_AS(p.integer("lr"), deepcam::Error);
  // A value the file gave is not a default, even one equal to it; one it left out is.
  const auto given = deepcam::check_table_file(write_toml("[optimizer]\nname = \"x\"\nmode = \"a\"\n"),
                                               "optimizer", kSchema);
  CHECK(!given.is_default("mode"));
  CHECK(given.is_default("lr"));
  CHECK(given.setting("lr").find("lr = 0.001 (default)") != std::string::npos);
  CHECK(given.setting("mode").find(":3 [optimizer] mode = \"a\"") != std::string::npos);
  CHECK_THROWS_AS(given.is_default("momentum"), deepcam::Error);

  const std::string typo = error_of("[optimizer]\nname = \"x\"\n\nlrr = 0.1\n");
  CHECK(typo.find(":4 [optimizer] lrr: unknown key; did you mean 'lr'?") != std::string::npos);
  CHECK(error_of("[optimizer]\nlr = \"fast\"\n").find("lr: expected float, got string") != std::string::npos);
  CHECK(error_of("[optimizer]\nlr = 11.0\n").find("out of range") != std::string::npos);
  CHECK(error_of("[optimizer]\nmilestones = [1, 2.5]\n").find("expected int list") != std::string::npos);
  CHECK(error_of("[optimizer]\nmode = \"c\"\n").find("not one of a, b") != std::string::npos);
  CHECK(error_of("[optimizer\n").find(".toml:1:") != std::string::npos);
}

TEST_CASE("an integer is checked against its bounds exactly, not as its nearest double") {
  using deepcam::in_range;
  constexpr std::int64_t kMost = std::numeric_limits<std::int64_t>::max();
  constexpr std::int64_t kLeast = std::numeric_limits<std::int64_t>::min();
  const deepcam::ParamSpec closed{"k", deepcam::ParamType::Int, "1", "d", 1, 9.2e18};
  CHECK(in_range(closed, std::int64_t{9200000000000000000}));
  CHECK_FALSE(in_range(closed, std::int64_t{9200000000000000001}));  // 9.2e18 as a double
  CHECK_FALSE(in_range(closed, kMost));                              // 2^63 as a double
  CHECK_FALSE(in_range(closed, std::int64_t{0}));
  // A bound that is no integer lies between two: 2.5 admits 2 and refuses 3.
  const deepcam::ParamSpec open{"k", deepcam::ParamType::Int, "1", "d", -2.5, 2.5, nullptr, true, true};
  CHECK(in_range(open, std::int64_t{-2}));
  CHECK(in_range(open, std::int64_t{2}));
  CHECK_FALSE(in_range(open, std::int64_t{3}));
  CHECK_FALSE(in_range(open, std::int64_t{-3}));
  // An open integral bound refuses itself; one past 2^63 or infinite admits every int64.
  const deepcam::ParamSpec exclusive{"k", deepcam::ParamType::Int, "1", "d", 0, 9.2e18, nullptr, true, true};
  CHECK_FALSE(in_range(exclusive, std::int64_t{0}));
  CHECK_FALSE(in_range(exclusive, std::int64_t{9200000000000000000}));
  const deepcam::ParamSpec wide{"k", deepcam::ParamType::Int, "1", "d", -1e19, deepcam::kUnbounded};
  CHECK(in_range(wide, kMost));
  CHECK(in_range(wide, kLeast));
  const deepcam::ParamSpec past{"k", deepcam::ParamType::Int, "1", "d", -9223372036854775808.0, 1e19};
  CHECK(in_range(past, kLeast));
  CHECK(deepcam::range_text(past) == "[-9223372036854775808, 1e+19]");
}

TEST_CASE("closest_match suggests near names only") {
  CHECK(deepcam::closest_match("deeplab", {"deeplabv3plus", "unet"}) == "");
  CHECK(deepcam::closest_match("deeplabv3pls", {"deeplabv3plus", "unet"}) == "deeplabv3plus");
  CHECK(deepcam::closest_match("adma", {"adam", "lamb"}) == "adam");
}

TEST_CASE("loss and IoU equal the reference's vectors") {
  const auto vectors = testjson::parse_file((test_support::testdata_dir() / "loss_iou_vectors.json").string());
  const auto w = deepcam::class_weights();
  const auto expected_w = vectors["class_weights"].numbers();
  for (int c = 0; c < 3; ++c) CHECK(w[c] == doctest::Approx(expected_w[c]).epsilon(1e-12));
  int cases = 0;
  for (const auto& c : vectors["cases"].array) {
    const auto shape = c["shape"].numbers();
    const std::vector<int64_t> s = {static_cast<int64_t>(shape[0]), static_cast<int64_t>(shape[1]),
                                    static_cast<int64_t>(shape[2]), static_cast<int64_t>(shape[3])};
    const auto logits = torch::tensor(c["logits"].numbers(), torch::kFloat32).reshape(s);
    const auto labels = torch::tensor(c["labels"].numbers(), torch::kFloat64).to(torch::kInt64).reshape({s[0], s[2], s[3]});
    INFO("case " << cases << " (" << c["mode"].string << ")");
    CHECK(deepcam::weighted_cross_entropy(logits, labels).item<double>() ==
          doctest::Approx(c["loss"].number).epsilon(1e-6));
    CHECK(deepcam::iou_score(logits, labels) == doctest::Approx(c["iou"].number).epsilon(1e-6));
    ++cases;
  }
  CHECK(cases == 5);
}

TEST_CASE("the prediction is argmax(softmax) exactly, also at near-ties of the logits") {
  // Class 1 within a few ulps of class 0: softmax rounds some of those pairs
  // to one probability, where the reference's argmax keeps class 0 and an
  // argmax of the logits would say 1.
  torch::manual_seed(0);
  at::Tensor x = torch::randn({2, 3, 64, 64}) * 5;
  const at::Tensor ulps = torch::randint(0, 3, {2, 64, 64}).to(torch::kFloat32);
  x.select(1, 1).copy_(x.select(1, 0) + ulps * std::numeric_limits<float>::epsilon() * x.select(1, 0).abs());
  const at::Tensor reference = torch::softmax(x, 1).argmax(1);
  REQUIRE(reference.ne(x.argmax(1)).sum().item<int64_t>() > 0);  // the case is exercised
  CHECK(deepcam::predict(x).to(torch::kLong).equal(reference));
  // Every layout and the other classes' ties too.
  const at::Tensor last = x.contiguous(at::MemoryFormat::ChannelsLast);
  CHECK(deepcam::predict(last).to(torch::kLong).equal(torch::softmax(last, 1).argmax(1)));
  const at::Tensor even = torch::zeros({1, 3, 2, 2});
  CHECK(deepcam::predict(even).to(torch::kLong).equal(torch::zeros({1, 2, 2}, torch::kLong)));
}

TEST_CASE("the IoU of each sample equals the per-class counting of SPEC 4.2") {
  torch::manual_seed(1);
  const at::Tensor logits = torch::randn({5, 3, 17, 23});
  at::Tensor labels = torch::randint(0, 3, {5, 17, 23});
  labels[4].fill_(0);  // a sample with two classes absent from its labels
  const at::Tensor pred = torch::softmax(logits, 1).argmax(1).flatten(1);
  const at::Tensor truth = labels.flatten(1);
  at::Tensor expected = torch::zeros({5}, torch::kFloat64);
  for (int64_t j = 0; j < 3; ++j) {
    const at::Tensor p = pred == j;
    const at::Tensor t = truth == j;
    const at::Tensor tp = (p & t).sum(1).to(torch::kFloat64);
    const at::Tensor uni = tp + (p & ~t).sum(1).to(torch::kFloat64) + (~p & t).sum(1).to(torch::kFloat64);
    expected += torch::where(uni > 0, tp / (3.0 * uni.clamp_min(1)), torch::full_like(uni, 1.0 / 3.0));
  }
  CHECK(deepcam::iou_per_sample(logits, labels).equal(expected));
}

TEST_CASE("a class absent from prediction and label scores 1/3") {
  // Every pixel background and predicted background: three perfect classes.
  auto logits = torch::zeros({1, 3, 2, 2});
  logits.select(1, 0).fill_(5.0);
  const auto labels = torch::zeros({1, 2, 2}, torch::kInt64);
  CHECK(deepcam::iou_score(logits, labels) == doctest::Approx(1.0));
  // Predict class 1 everywhere: class 0 has tp 0, class 1 fp 4, class 2 absent.
  auto wrong = torch::zeros({1, 3, 2, 2});
  wrong.select(1, 1).fill_(5.0);
  CHECK(deepcam::iou_score(wrong, labels) == doctest::Approx(1.0 / 3.0));
}

// The only case here that touches the process's signal mask: it ends with
// SIGINT and SIGTERM taken by their own thread, as in deepcam-host.
TEST_CASE("run_engine refuses to run until SIGINT and SIGTERM have a thread of their own") {
  auto on_new_thread = [] {
    bool seen = true;
    std::thread([&] { seen = deepcam::stop_signals_on_own_thread(); }).join();
    return seen;
  };
  const auto unblocked_here = [] {
    sigset_t mask;
    REQUIRE(::pthread_sigmask(SIG_BLOCK, nullptr, &mask) == 0);
    return sigismember(&mask, SIGINT) == 0 && sigismember(&mask, SIGTERM) == 0;
  };
  REQUIRE(unblocked_here());
  CHECK_FALSE(deepcam::stop_signals_on_own_thread());
  CHECK_FALSE(on_new_thread());
  // Checked before the configuration is read: an empty one does not matter.
  try {
    (void)deepcam::run_engine(deepcam::RunConfig{}, deepcam::EngineOptions{});
    FAIL("run_engine ran with SIGINT and SIGTERM free to reach its threads");
  } catch (const deepcam::Error& e) {
    CHECK(std::string(e.what()).find("call deepcam::take_stop_signals_on_own_thread()") != std::string::npos);
  }
  // Blocked by hand, with no thread to take them, is not enough either.
  sigset_t both;
  sigemptyset(&both);
  sigaddset(&both, SIGINT);
  sigaddset(&both, SIGTERM);
  REQUIRE(::pthread_sigmask(SIG_BLOCK, &both, nullptr) == 0);
  CHECK_FALSE(deepcam::stop_signals_on_own_thread());
  REQUIRE(::pthread_sigmask(SIG_UNBLOCK, &both, nullptr) == 0);

  deepcam::take_stop_signals_on_own_thread();
  CHECK_FALSE(unblocked_here());
  CHECK(deepcam::stop_signals_on_own_thread());
  CHECK(on_new_thread());  // threads started from here on inherit the block
  // A thread that unblocks them again could take a handler.
  bool seen = true;
  std::thread([&] {
    ::pthread_sigmask(SIG_UNBLOCK, &both, nullptr);
    seen = deepcam::stop_signals_on_own_thread();
  }).join();
  CHECK_FALSE(seen);
  deepcam::restore_start_signal_mask();
  CHECK(unblocked_here());
  CHECK_FALSE(deepcam::stop_signals_on_own_thread());
}
