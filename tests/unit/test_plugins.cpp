// The generic plugin test (STYLE 8): every plugin folder in the source tree is
// loaded through the real loader from the build tree only, its description is
// checked, it is built from its folder's test.toml and run once.
#include <torch/nn/module.h>
#include <torch/types.h>
#undef CHECK
#include <doctest/doctest.h>

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "deepcam/config.hpp"
#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "deepcam/npy.hpp"
#include "deepcam/plugin_loader.hpp"
#include "test_paths.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using namespace deepcam;

namespace {

const fs::path kSource = test_support::source_dir();
const fs::path kBuild = test_support::build_dir();

struct Folder {
  PluginKind kind;
  std::string name;
  fs::path dir;
};

std::vector<Folder> plugin_folders() {
  std::vector<Folder> out;
  const PluginKind kinds[] = {PluginKind::Reader, PluginKind::Model, PluginKind::Optimizer, PluginKind::Scheduler};
  for (PluginKind kind : kinds) {
    const fs::path dir = kSource / "plugins" / (std::string(to_string(kind)) + "s");
    for (const auto& e : fs::directory_iterator(dir)) {
      // Code shared by plugins (optimizers/fused) has a folder but no entry point.
      if (e.is_directory() && fs::exists(e.path() / "plugin.cpp"))
        out.push_back({kind, e.path().filename().string(), e.path()});
    }
  }
  return out;
}

// The build tree only: no DEEPCAM_PLUGIN_PATH from the environment, no install dir.
PluginLoader build_tree_loader() { return PluginLoader({(kBuild / "plugins").string()}, "/nonexistent"); }

// The numpy layout (SPEC 1.5) beside the HDF5 files: data-X.npy and
// label-X.npy next to each data-X.h5. Each reader lists only its own files,
// so one root serves every reader plugin, wrapped or not.
void add_npy_pairs(const fs::path& root) {
  for (const char* split : {"train", "validation"}) {
    std::vector<fs::path> samples;
    for (const auto& e : fs::directory_iterator(root / split))
      if (e.path().extension() == ".h5") samples.push_back(e.path());
    for (const fs::path& sample : samples) {
      const h5::File file = h5::File::open(sample.string());
      const h5::Shape d = file.shape("climate/data"), l = file.shape("climate/labels_0");
      std::vector<float> data(d[0] * d[1] * d[2]);
      std::vector<std::int64_t> labels(l[0] * l[1]);
      file.read("climate/data", data.data(), data.size());
      file.read("climate/labels_0", labels.data(), labels.size());
      const std::string x = sample.stem().string().substr(5);  // data-X.h5 -> X
      const auto dim = [](std::uint64_t n) { return static_cast<std::int64_t>(n); };
      npy::write((root / split / ("data-" + x + ".npy")).string(), npy::DType::Float32,
                 {dim(d[0]), dim(d[1]), dim(d[2])}, data.data());
      npy::write((root / split / ("label-" + x + ".npy")).string(), npy::DType::Int64,
                 {dim(l[0]), dim(l[1])}, labels.data());
    }
  }
}

// A small synthetic data set for the readers, made by deepcam-data, in both
// layouts.
std::string data_root() {
  static const std::string root = [] {
    const fs::path dir = fs::temp_directory_path() / ("deepcam_test_plugins_" + std::to_string(::getpid()));
    const std::string cmd = (kBuild / "core" / "deepcam-data").string() + " synth --out " + dir.string() +
                            " --train 4 --validation 3 --height 32 --width 48 --seed 2 > /dev/null 2>&1";
    REQUIRE(std::system(cmd.c_str()) == 0);
    add_npy_pairs(dir);
    return dir.string();
  }();
  return root;
}

void run_once(const Folder& f, const LoadedPlugin& p, const Params& params) {
  const PluginDescriptor& d = *p.descriptor;
  switch (f.kind) {
    case PluginKind::Reader: {
      MlperfLog* no_log = nullptr;
      ReaderContext ctx{data_root(), {0, 7, 15}, 2, 2, 0, 1, 1, no_log};
      auto reader = d.make_reader(params, ctx);
      CHECK(reader->global_samples(Split::Train) == 4);
      CHECK(reader->global_samples(Split::Validation) == 3);
      reader->start_epoch(Split::Train, 0);
      Batch b;
      REQUIRE(reader->next(b));
      CHECK((b.data.sizes() == torch::IntArrayRef{2, 3, 32, 48}));
      CHECK((b.labels.sizes() == torch::IntArrayRef{2, 32, 48}));
      CHECK((b.labels.scalar_type() == torch::kInt64));
      CHECK(torch::isfinite(b.data).all().item<bool>());
      break;
    }
    case PluginKind::Model: {
      auto model = d.make_model(params, ModelContext{4, 3, 0, 1});
      const auto out = model->forward(torch::randn({2, 4, 32, 48}));
      CHECK((out.sizes() == torch::IntArrayRef{2, 3, 32, 48}));
      CHECK(!model->module().parameters().empty());
      break;
    }
    case PluginKind::Optimizer: {
      auto w = torch::ones({3}, torch::requires_grad());
      auto opt = d.make_optimizer(params, OptimizerContext{{w}});
      (w * torch::tensor({1.0f, 2.0f, 3.0f})).sum().backward();
      const auto before = w.detach().clone();
      opt->step();
      CHECK(!torch::equal(before, w.detach()));
      CHECK(opt->lr() > 0);
      opt->zero_grad();
      break;
    }
    case PluginKind::Scheduler: {
      auto s = d.make_scheduler(params, SchedulerContext{0.01});
      for (int step = 0; step < 5; ++step) {
        const double lr = s->lr_at(step);
        CHECK(std::isfinite(lr));
        CHECK(lr >= 0.0);
      }
      break;
    }
  }
}

}  // namespace

TEST_CASE("every plugin folder builds a plugin the loader accepts, described and runnable") {
  const auto folders = plugin_folders();
  CHECK(folders.size() >= 4);
  PluginLoader loader = build_tree_loader();
  for (const auto& f : folders) {
    INFO(f.dir.string());
    const LoadedPlugin& p = loader.load(f.kind, f.name);
    const PluginDescriptor& d = *p.descriptor;
    CHECK(p.path.find((kBuild / "plugins").string()) == 0);
    CHECK((d.kind == f.kind));
    CHECK(std::string(d.name) == f.name);
    CHECK(std::string(d.version).size() > 0);
    CHECK(std::string(d.summary).size() > 0);
    // Its schema (a doc for every key, no `name` or `library`, defaults of
    // their type and range) the loader has checked: schema_problem.
    const fs::path test_toml = f.dir / "test.toml";
    REQUIRE(fs::exists(test_toml));
    // Defaults must parse and pass their own ranges: check_table_file fills them in.
    // A nested plugin table ([reader.source]) is loaded by the same build-tree loader.
    const Params params = check_table_file(test_toml.string(), to_string(f.kind), d.params, &loader);
    run_once(f, p, params);
  }
}

TEST_CASE("the loader sees only the build tree when told so") {
  PluginLoader loader = build_tree_loader();
  std::vector<std::string> problems;
  const auto found = loader.discover(problems);
  CHECK(problems.empty());
  CHECK(found.size() == plugin_folders().size());
  CHECK_THROWS_WITH_AS(loader.load(PluginKind::Optimizer, "nosuch"),
                       doctest::Contains("no optimizer plugin named 'nosuch'; found: adam"), Error);
}

TEST_CASE("the host's own sections pass the check the loader makes of a plugin's schema") {
  for (const char* section : {"run", "data", "mlperf"}) {
    INFO(section);
    CHECK(schema_problem(host_schema(section)) == "");
  }
}

TEST_CASE("build_plugged names the plugin's library for its factory's faults, not for its errors") {
  const PluginDescriptor descriptor{};
  const LoadedPlugin described{"/plugins/libdeepcam_scheduler_x.so", &descriptor, nullptr};
  // A factory that does `fault` (and returns nothing if it comes back).
  const auto fails = [](auto fault) {
    return [fault](const PluginDescriptor&) -> std::unique_ptr<Scheduler> {
      fault();
      return nullptr;
    };
  };
  const Params params("run.toml [scheduler]", {});
  CHECK_THROWS_WITH_AS(build_plugged(described, fails([&] { params.integer("steps"); })),
                       "/plugins/libdeepcam_scheduler_x.so: a bug in the plugin: the plugin asked for parameter "
                       "'steps', which its schema does not declare (table run.toml [scheduler])",
                       std::logic_error);
  CHECK_THROWS_WITH_AS(build_plugged(described, fails([] { throw std::runtime_error("no memory"); })),
                       "/plugins/libdeepcam_scheduler_x.so: the plugin's factory failed: no memory", std::logic_error);
  CHECK_THROWS_WITH_AS(build_plugged(described, fails([] { throw 42; })),
                       "/plugins/libdeepcam_scheduler_x.so: the plugin's factory threw an exception that is not a "
                       "std::exception",
                       std::logic_error);
  CHECK_THROWS_WITH_AS(build_plugged(described, fails([] { throw Error("run.toml:3 [scheduler] steps: too many"); })),
                       "run.toml:3 [scheduler] steps: too many", Error);
  // A nullptr is a fault of the plugin's code as the others are, not a mistake in the run file.
  CHECK_THROWS_WITH_AS(build_plugged(described, fails([] {})),
                       "/plugins/libdeepcam_scheduler_x.so: a bug in the plugin: the factory returned nothing (nullptr)",
                       std::logic_error);
  // LibTorch's own message, without the C++ backtrace its what() carries.
  CHECK_THROWS_WITH_AS(build_plugged(described, fails([] { TORCH_CHECK(false, "shapes differ"); })),
                       "/plugins/libdeepcam_scheduler_x.so: the plugin's factory failed: shapes differ",
                       std::logic_error);
}

TEST_CASE("listing marks a plugin that one found earlier on the search path shadows") {
  const test_support::TempDir dup;
  const fs::path installed = kBuild / "plugins" / "optimizers" / "adam" / "libdeepcam_optimizer_adam.so";
  fs::copy_file(installed, dup.path / installed.filename());
  PluginLoader loader({dup.path.string()}, (kBuild / "plugins").string());
  std::vector<std::string> problems;
  std::vector<std::string> adams;
  for (const auto& p : loader.discover(problems)) {
    if (p.descriptor->kind == PluginKind::Optimizer && std::string(p.descriptor->name) == "adam")
      adams.push_back(p.path + " " + p.not_used_because);
  }
  CHECK(adams == std::vector<std::string>{(dup.path / installed.filename()).string() + " ",
                                          installed.string() + " shadowed by " +
                                              (dup.path / installed.filename()).string()});
}

TEST_CASE("a relative folder of DEEPCAM_PLUGIN_PATH is taken from the working directory once, when read") {
  // Kept relative, it was recorded relative in config.toml, which then found nothing when rerun elsewhere.
  REQUIRE(::setenv("DEEPCAM_PLUGIN_PATH", "relp:/abs/p::./dot", 1) == 0);
  const PluginLoader loader;
  ::unsetenv("DEEPCAM_PLUGIN_PATH");
  const std::vector<std::string> dirs = loader.search_dirs();
  REQUIRE(dirs.size() >= 3);
  CHECK(std::vector<std::string>(dirs.begin(), dirs.begin() + 3) ==
        std::vector<std::string>{(fs::current_path() / "relp").string(), "/abs/p",
                                 (fs::current_path() / "./dot").string()});
}
