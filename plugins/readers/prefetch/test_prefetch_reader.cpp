// Unit tests of deepcam::readers::PrefetchReader and StagingArea: the ring
// (bounded read-ahead, buffers still held are not overwritten), batches that
// do not depend on the number of threads and equal the source reader's own,
// errors handed over at the batch they belong to, and staging (copies equal
// to their sources, reads go to them, removed at exit and after an error),
// and the GPU's normalisation over a file reader (its at:: ops run on the CPU
// here, on the GPU where one is present). Node-shared staging runs the ranks
// of one node as threads of this process, joined by an in-process Group.
#include <ATen/ops/empty.h>
#include <ATen/Context.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <fcntl.h>
#include <ftw.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/group.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/sharding.hpp"
#include "deepcam/stop_request.hpp"
#include "../hdf5/hdf5_reader.hpp"
#include "device_copy.hpp"
#include "prefetch_reader.hpp"
#include "staging.hpp"
#include "test_paths.hpp"

// Last: c10's logging header defines its own CHECK, which must not win.
#undef CHECK
#include <doctest/doctest.h>

namespace fs = std::filesystem;
using deepcam::Batch;
using deepcam::Error;
using deepcam::ReaderContext;
using deepcam::ShuffleMode;
using deepcam::Split;
using deepcam::readers::PrefetchOptions;
using deepcam::readers::PrefetchReader;
using deepcam::readers::StagingArea;

namespace {

// Not std::filesystem::remove_all: libtorch.so exports a broken copy of it.
void remove_tree(const fs::path& path) {
  nftw(
      path.c_str(), [](const char* file, const struct stat*, int, struct FTW*) { return ::remove(file); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "deepcam_prefetch_XXXXXX").string();
    REQUIRE(mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() { remove_tree(path); }
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  return out;
}

constexpr std::int64_t kC = 2, kH = 3, kW = 4;

// A source whose sample i is a real file holding "sample i" (so that staging
// has something to copy) and whose values encode i and the position, so that
// any mix-up shows. Reads take a random few hundred microseconds, so that
// workers finish out of order.
class FakeSource final : public deepcam::Reader {
 public:
  FakeSource(const fs::path& dir, std::int64_t train, std::int64_t validation, const ReaderContext& ctx)
      : ctx_(ctx) {
    for (const char* split : {"train", "validation"}) {
      const std::int64_t n = std::string(split) == "train" ? train : validation;
      fs::create_directories(dir / split);
      for (std::int64_t i = 0; i < n; ++i) {
        const fs::path f = dir / split / ("sample-" + std::to_string(1000 + i) + ".bin");
        std::ofstream(f) << split << ' ' << i << std::string(static_cast<std::size_t>(100 + 37 * i), 'x');
        files_[std::string(split) == "train" ? 0 : 1].push_back(f.string());
      }
    }
  }
  std::int64_t global_samples(Split s) const override { return sample_count(s); }
  std::int64_t local_samples(Split s) const override { return sample_count(s); }
  // Its own order, sequentially: the reference's global order for training.
  void start_epoch(Split s, std::int64_t epoch) override {
    split_ = s;
    pos_ = 0;
    order_ = s == Split::Train
                 ? deepcam::training_indices(sample_count(s), ctx_.rank, ctx_.world_size, ctx_.seed, epoch)
                 : deepcam::validation_indices(sample_count(s), ctx_.rank, ctx_.world_size);
  }
  bool next(Batch& b) override {
    const std::int64_t bs = split_ == Split::Train ? ctx_.train_batch_size : ctx_.validation_batch_size;
    const std::int64_t n = std::min<std::int64_t>(bs, static_cast<std::int64_t>(order_.size()) - pos_);
    if (n <= 0) return false;
    b.data = at::empty({n, kC, kH, kW}, at::kFloat);
    b.labels = at::empty({n, kH, kW}, at::kLong);
    for (std::int64_t j = 0; j < n; ++j) {
      read_sample(sample_files(split_, order_[static_cast<std::size_t>(pos_ + j)]),
                  b.data.data_ptr<float>() + j * kC * kH * kW, b.labels.data_ptr<std::int64_t>() + j * kH * kW);
    }
    pos_ += n;
    return true;
  }
  std::int64_t sample_count(Split s) const override {
    return static_cast<std::int64_t>(files_[s == Split::Train ? 0 : 1].size());
  }
  std::vector<std::string> sample_files(Split s, std::int64_t i) const override {
    return {files_[s == Split::Train ? 0 : 1].at(static_cast<std::size_t>(i))};
  }
  std::vector<std::int64_t> sample_shape() const override { return {kC, kH, kW}; }
  void read_sample(const std::vector<std::string>& files, float* data, std::int64_t* labels) const override {
    thread_local std::mt19937 gen(std::hash<std::thread::id>()(std::this_thread::get_id()));
    std::this_thread::sleep_for(delay_ > 0 ? std::chrono::microseconds(delay_)
                                           : std::chrono::microseconds(gen() % 400));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      read_paths_.push_back(files.at(0));
    }
    ++reads_;
    std::istringstream in(read_text(files.at(0)));
    std::string split;
    std::int64_t i = -1;
    in >> split >> i;
    if (i < 0) throw Error(files[0] + ": not a fake sample");
    if (i == fail_at_ && (fail_split_.empty() || split == fail_split_)) throw Error(files[0] + ": injected failure");
    const float base = (split == "train" ? 0.0f : 0.5f) + static_cast<float>(i);
    for (std::int64_t k = 0; k < kC * kH * kW; ++k) data[k] = base + static_cast<float>(k) / 1000.0f;
    for (std::int64_t k = 0; k < kH * kW; ++k) labels[k] = i * 100 + k;
  }

  std::int64_t fail_at_ = -1;
  std::string fail_split_;  // "train" or "validation": fail_at_ there only; "": in both
  std::int64_t delay_ = 0;  // microseconds per read; 0: random, below 400
  mutable std::atomic<std::int64_t> reads_{0};
  mutable std::mutex mutex_;
  mutable std::vector<std::string> read_paths_;

 private:
  ReaderContext ctx_;
  std::vector<std::string> files_[2];
  Split split_ = Split::Train;
  std::vector<std::int64_t> order_;
  std::int64_t pos_ = 0;
};

ReaderContext context(std::int64_t train_bs = 3, std::int64_t val_bs = 2, int rank = 0, int world = 1) {
  ReaderContext c{};
  c.train_batch_size = train_bs;
  c.validation_batch_size = val_bs;
  c.rank = rank;
  c.world_size = world;
  c.seed = 7;
  c.log = nullptr;
  return c;
}

PrefetchOptions options(int threads, int depth, ShuffleMode mode = ShuffleMode::Global) {
  PrefetchOptions o;
  o.threads = threads;
  o.depth = depth;
  o.shuffle_mode = mode;
  o.where = "test.toml [reader]";
  return o;
}

// What Params::setting("stage_dir") gives for a stage_dir set in a file.
std::string stage_setting(const std::string& dir) { return "test.toml:5 [reader] stage_dir = \"" + dir + "\""; }

struct Drained {
  std::vector<at::Tensor> data, labels;
};

Drained drain(deepcam::Reader& r, Split s, std::int64_t epoch) {
  Drained d;
  r.start_epoch(s, epoch);
  Batch b;
  while (r.next(b)) {
    d.data.push_back(b.data.clone());
    d.labels.push_back(b.labels.clone());
  }
  return d;
}

bool same(const Drained& a, const Drained& b) {
  if (a.data.size() != b.data.size()) return false;
  for (std::size_t i = 0; i < a.data.size(); ++i) {
    if (!at::equal(a.data[i], b.data[i]) || !at::equal(a.labels[i], b.labels[i])) return false;
  }
  return true;
}

// Bit for bit: the float tensors compared as int32 (at::equal on floats
// would take -0.0 for 0.0).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  if (a.scalar_type() != at::kFloat) return at::equal(a.contiguous(), b.contiguous());
  return at::equal(a.contiguous().view(at::kInt), b.contiguous().view(at::kInt));
}

bool same_bits(const Drained& a, const Drained& b) {
  if (a.data.size() != b.data.size()) return false;
  for (std::size_t i = 0; i < a.data.size(); ++i) {
    if (!same_bits(a.data[i], b.data[i]) || !same_bits(a.labels[i], b.labels[i])) return false;
  }
  return true;
}

// deepcam-data synth's HDF5 data set in dir/data, for the readers over it.
ReaderContext synth_context(const fs::path& dir, std::vector<std::int64_t> channels) {
  const std::string cmd = (test_support::build_dir() / "core/deepcam-data").string() + " synth --out " +
                          dir.string() +
                          "/data --train 7 --validation 3 --height 16 --width 24 --seed 4 > /dev/null 2>&1";
  REQUIRE(std::system(cmd.c_str()) == 0);
  ReaderContext ctx = context(2, 2);
  ctx.data_root = (dir / "data").string();
  ctx.channels = std::move(channels);
  return ctx;
}

// The ranks of one node as threads of this process: member(r) is node rank
// r's deepcam::Group. The k-th collective of every member meets in one shared
// slot: each puts its tensor there, waits for the others, and reads the
// result from all of them. Members that call different collectives, or one
// that waits a minute for the others, get an exception instead of a hang.
class ThreadNode {
 public:
  explicit ThreadNode(int size) : size_(size), next_(static_cast<std::size_t>(size), 0) {
    for (int r = 0; r < size; ++r) members_.push_back(std::make_unique<Member>(*this, r));
  }
  deepcam::Group& member(int r) { return *members_.at(static_cast<std::size_t>(r)); }
  // Collectives node rank r has made.
  std::int64_t calls(int r) {
    std::lock_guard<std::mutex> lock(mutex_);
    return next_.at(static_cast<std::size_t>(r));
  }

 private:
  class Member final : public deepcam::Group {
   public:
    Member(ThreadNode& node, int rank) : node_(node), rank_(rank) {}
    int size() const override { return node_.size_; }
    int rank() const override { return rank_; }
    void barrier() override {
      node_.collective(rank_, "barrier", at::zeros({1}), [](const auto&) { return at::Tensor(); });
    }
    void all_reduce_sum(at::Tensor& tensor) override {
      tensor.copy_(node_.collective(rank_, "all_reduce_sum", tensor, [](const std::vector<at::Tensor>& in) {
        at::Tensor sum = in[0].clone();
        for (std::size_t i = 1; i < in.size(); ++i) sum += in[i];
        return sum;
      }));
    }
    at::Tensor all_gather(const at::Tensor& tensor) override {
      return node_.collective(rank_, "all_gather", tensor,
                              [](const std::vector<at::Tensor>& in) { return at::stack(in); });
    }

   private:
    ThreadNode& node_;
    int rank_;
  };

  struct Call {
    std::string op;
    std::vector<at::Tensor> in;
    int arrived = 0, left = 0;
  };

  at::Tensor collective(int rank, const std::string& op, const at::Tensor& tensor,
                        const std::function<at::Tensor(const std::vector<at::Tensor>&)>& combine) {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::int64_t k = next_[static_cast<std::size_t>(rank)]++;
    Call& call = calls_[k];
    if (call.in.empty()) call.in.resize(static_cast<std::size_t>(size_));
    if (!call.op.empty() && call.op != op) {
      throw std::runtime_error("fake node group: collective " + std::to_string(k) + " is " + call.op +
                               " on one rank and " + op + " on another");
    }
    for (const at::Tensor& other : call.in) {
      if (other.defined() && (other.sizes() != tensor.sizes() || other.scalar_type() != tensor.scalar_type())) {
        throw std::runtime_error("fake node group: " + op + " of tensors of different shapes or types");
      }
    }
    call.op = op;
    call.in[static_cast<std::size_t>(rank)] = tensor.detach().clone();
    ++call.arrived;
    cv_.notify_all();
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return call.arrived == size_; })) {
      throw std::runtime_error("fake node group: node rank " + std::to_string(rank) + " waited a minute in " + op +
                               " for the other ranks");
    }
    at::Tensor out = combine(call.in);
    if (++call.left == size_) calls_.erase(k);
    return out;
  }

  const int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::int64_t> next_;
  std::map<std::int64_t, Call> calls_;
  std::vector<std::unique_ptr<Member>> members_;
};

// Runs f(r) for r = 0 .. n - 1 at once, each on its own thread (the ranks
// of a node); the message of each one's exception, "" where none.
std::vector<std::string> on_ranks(int n, const std::function<void(int)>& f) {
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        f(r);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
        if (errors[static_cast<std::size_t>(r)].empty()) errors[static_cast<std::size_t>(r)] = "(empty message)";
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

// Regular files under `dir`, by path relative to it.
std::set<std::string> files_under(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) out.insert(fs::relative(e.path(), dir).string());
  }
  return out;
}

std::string read_file(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string text;
  char buf[4096];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
  return text;
}

// Node rank r of world 2, both ranks on one node.
ReaderContext node_rank_context(int r) {
  ReaderContext c = context(2, 2, r, 2);
  c.local_rank = r;
  c.local_size = 2;
  return c;
}

template <typename F>
bool eventually(F&& f) {
  for (int i = 0; i < 400; ++i) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return f();
}

}  // namespace

TEST_CASE("batches do not depend on the number of threads and equal the source's own order in global mode") {
  TempDir dir;
  const auto ctx = context(3, 2);
  FakeSource reference(dir.path, 17, 5, ctx);
  const Drained own0 = drain(reference, Split::Train, 0), own1 = drain(reference, Split::Train, 1);
  const Drained own_val = drain(reference, Split::Validation, 0);
  REQUIRE(own0.data.size() == 6);  // 17 samples, batches of 3: the last has 2
  CHECK(own0.data.back().size(0) == 2);
  CHECK(!same(own0, own1));  // a new permutation each epoch
  for (int threads : {1, 2, 5}) {
    for (int depth : {1, 3}) {
      INFO("threads " << threads << " depth " << depth);
      PrefetchReader r(ctx, options(threads, depth), std::make_unique<FakeSource>(dir.path, 17, 5, ctx));
      CHECK(r.global_samples(Split::Train) == 17);
      CHECK(r.local_samples(Split::Train) == 17);
      CHECK(r.global_samples(Split::Validation) == 5);
      CHECK(same(drain(r, Split::Train, 0), own0));
      CHECK(same(drain(r, Split::Validation, 0), own_val));
      CHECK(same(drain(r, Split::Train, 1), own1));
    }
  }
}

TEST_CASE("node and gpu modes: the order follows the core sharding, whatever the thread count") {
  TempDir dir;
  for (ShuffleMode mode : {ShuffleMode::Node, ShuffleMode::Gpu}) {
    // Rank 1 of 4, two ranks per node.
    ReaderContext ctx = context(2, 2, 1, 4);
    ctx.local_rank = 1;
    ctx.local_size = 2;
    deepcam::ShardingSetup setup;
    setup.files = 23;
    setup.rank = 1;
    setup.world_size = 4;
    setup.local_rank = 1;
    setup.local_size = 2;
    setup.seed = 7;
    setup.mode = mode;
    setup.oversampling_factor = 2;
    const deepcam::TrainingSharding sharding(setup);
    Drained first;
    for (int threads : {1, 2, 5}) {
      INFO(deepcam::to_string(mode) << " threads " << threads);
      auto o = options(threads, 2, mode);
      o.oversampling_factor = 2;
      PrefetchReader r(ctx, o, std::make_unique<FakeSource>(dir.path / deepcam::to_string(mode), 23, 6, ctx));
      CHECK(r.global_samples(Split::Train) == sharding.global_samples());
      CHECK(r.local_samples(Split::Train) == sharding.local_samples());
      for (std::int64_t epoch : {0, 1, 2}) {
        const Drained d = drain(r, Split::Train, epoch);
        CHECK(r.epoch_order() == sharding.order(epoch));
        // Sample i's first value is i: the batches hold the order's samples.
        std::vector<std::int64_t> seen;
        for (const auto& t : d.data) {
          for (std::int64_t j = 0; j < t.size(0); ++j) {
            seen.push_back(static_cast<std::int64_t>(t.data_ptr<float>()[j * kC * kH * kW]));
          }
        }
        CHECK(seen == sharding.order(epoch));
        if (epoch == 1) {
          if (threads == 1) first = d;
          else CHECK(same(d, first));
        }
      }
    }
  }
}

TEST_CASE("the ring reads ahead exactly depth batches beyond those the consumer holds") {
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 40, 2, ctx);
  FakeSource* fake = source.get();
  const int depth = 3;
  PrefetchReader r(ctx, options(4, depth), std::move(source));
  r.start_epoch(Split::Train, 0);
  // Nothing consumed: the ring's depth + 2 slots fill, then the workers wait.
  const std::int64_t full = (depth + 2) * 2;
  CHECK(eventually([&] { return fake->reads_.load() == full; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(fake->reads_.load() == full);
  Batch b;
  REQUIRE(r.next(b));  // batch 0 handed out, held
  REQUIRE(r.next(b));  // batch 1 handed out; batch 0 still counted as held
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(fake->reads_.load() == full);
  REQUIRE(r.next(b));  // batch 2: batch 0 goes back, one more batch is read
  CHECK(eventually([&] { return fake->reads_.load() == full + 2; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(fake->reads_.load() == full + 2);
}

TEST_CASE("while the ring keeps up, the training step does not wait for reads") {
  // Reads of 20 ms per sample, 2 samples per batch, 4 workers: a batch takes
  // ~10 ms of reading with the ring; the "training step" takes 30 ms. After
  // the first batch, next() should find every batch ready. Sleeps, not CPU
  // work, so that a busy machine cannot make the reads slower than the step.
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 24, 2, ctx);
  source->delay_ = 20000;
  PrefetchReader r(ctx, options(4, 3), std::move(source));
  r.start_epoch(Split::Train, 0);
  Batch b;
  REQUIRE(r.next(b));
  double waited = 0.0;
  std::int64_t batches = 1;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    const auto t0 = std::chrono::steady_clock::now();
    if (!r.next(b)) break;
    waited += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++batches;
  }
  CHECK(batches == 12);
  // Read in line, the 11 batches would cost 11 x 40 ms of waiting.
  INFO("waited " << waited << " s");
  CHECK(waited < 0.05);
}

// The CUDA cases are reported as skipped where no GPU is seen.
TEST_CASE("on CUDA: batches arrive on the GPU, equal to the CPU path" * doctest::skip(!at::hasCUDA())) {
  TempDir dir;
  ReaderContext cpu = context(3, 2);
  ReaderContext gpu = cpu;
  gpu.device = "cuda";
  PrefetchReader on_cpu(cpu, options(2, 2), std::make_unique<FakeSource>(dir.path, 11, 4, cpu));
  PrefetchReader on_gpu(gpu, options(2, 2), std::make_unique<FakeSource>(dir.path, 11, 4, gpu));
  for (Split s : {Split::Train, Split::Validation}) {
    on_cpu.start_epoch(s, 1);
    on_gpu.start_epoch(s, 1);
    Batch a, b;
    while (on_cpu.next(a)) {
      REQUIRE(on_gpu.next(b));
      CHECK(b.data.is_cuda());
      CHECK(b.labels.is_cuda());
      CHECK(at::equal(a.data, b.data.cpu()));
      CHECK(at::equal(a.labels, b.labels.cpu()));
    }
    CHECK(!on_gpu.next(b));
  }
}

TEST_CASE("on CUDA over the HDF5 reader: normalised on the GPU, the batches of the CPU path bit for bit" *
          doctest::skip(!at::hasCUDA())) {
  TempDir dir;
  // All 16 channels (the CPU's vector path) and a mixed selection.
  for (const std::vector<std::int64_t>& channels :
       {std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        std::vector<std::int64_t>{3, 0, 15}}) {
    INFO(channels.size());
    const TempDir data;
    const ReaderContext cpu = synth_context(data.path, channels);
    ReaderContext gpu = cpu;
    gpu.device = "cuda";
    deepcam::readers::Hdf5ReaderOptions ho;
    ho.threads = 1;
    PrefetchReader on_cpu(cpu, options(2, 2), std::make_unique<deepcam::readers::Hdf5Reader>(cpu, ho));
    PrefetchReader on_gpu(gpu, options(2, 2), std::make_unique<deepcam::readers::Hdf5Reader>(gpu, ho));
    CHECK(!on_cpu.normalises_on_device());
    CHECK(on_gpu.normalises_on_device());
    for (std::int64_t epoch : {0, 1}) {
      const Drained a = drain(on_cpu, Split::Train, epoch);
      const Drained b = drain(on_gpu, Split::Train, epoch);
      REQUIRE(!b.data.empty());
      CHECK(b.data.front().is_cuda());
      CHECK(b.data.front().is_contiguous());
      Drained b_host;
      for (std::size_t i = 0; i < b.data.size(); ++i) {
        b_host.data.push_back(b.data[i].cpu());
        b_host.labels.push_back(b.labels[i].cpu());
      }
      CHECK(same_bits(a, b_host));
    }
    const Drained a = drain(on_cpu, Split::Validation, 0);
    Drained b = drain(on_gpu, Split::Validation, 0);
    for (auto& t : b.data) t = t.cpu();
    for (auto& t : b.labels) t = t.cpu();
    CHECK(same_bits(a, b));
  }
  // A source that is not a file reader: normalised by itself, on the CPU.
  ReaderContext gpu = context(3, 2);
  gpu.device = "cuda";
  PrefetchReader fake_gpu(gpu, options(1, 1), std::make_unique<FakeSource>(dir.path, 5, 2, gpu));
  CHECK(!fake_gpu.normalises_on_device());
}

TEST_CASE("the GPU's normalisation run on the CPU: raw samples through normalise_batch are the HDF5 reader's batches") {
  // What the side stream runs on CUDA, with the same at:: ops on CPU
  // tensors, against the HDF5 reader's own batches, bit for bit.
  for (const std::vector<std::int64_t>& channels :
       {std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        std::vector<std::int64_t>{3, 0, 15}, std::vector<std::int64_t>{9, 10, 11, 12, 2}}) {
    INFO(channels.size());
    TempDir dir;
    const ReaderContext ctx = synth_context(dir.path, channels);
    deepcam::readers::Hdf5ReaderOptions ho;
    ho.threads = 2;
    deepcam::readers::Hdf5Reader own(ctx, ho);
    const auto c = static_cast<std::int64_t>(channels.size());
    std::vector<float> shift = own.shift(), scale = own.scale();
    const at::Tensor shift_t = at::from_blob(shift.data(), {c}, at::kFloat);
    const at::Tensor scale_t = at::from_blob(scale.data(), {c}, at::kFloat);
    for (const Split split : {Split::Train, Split::Validation}) {
      own.start_epoch(split, 1);
      const std::vector<std::string> files = own.epoch_files();
      std::size_t position = 0;
      Batch batch;
      while (own.next(batch)) {
        const std::int64_t n = batch.data.size(0);
        at::Tensor raw = at::empty({n, 16, 24, c}, at::kFloat);
        at::Tensor labels = at::empty({n, 16, 24}, at::kLong);
        for (std::int64_t j = 0; j < n; ++j) {
          own.read_sample_selected({files.at(position++)}, raw.data_ptr<float>() + j * 16 * 24 * c,
                                   labels.data_ptr<std::int64_t>() + j * 16 * 24);
        }
        const at::Tensor normalised = deepcam::readers::normalise_batch(raw, shift_t, scale_t);
        CHECK(normalised.is_contiguous());
        CHECK(same_bits(normalised, batch.data));
        CHECK(same_bits(labels, batch.labels));
        // channels_last: the same values, nothing transposed (the raw
        // samples' (B, H, W, C) memory order kept).
        const at::Tensor nhwc = deepcam::readers::normalise_batch(raw, shift_t, scale_t, /*channels_last=*/true);
        CHECK(nhwc.is_contiguous(at::MemoryFormat::ChannelsLast));
        CHECK(same_bits(nhwc.contiguous(), batch.data));
      }
      CHECK(position == files.size());
    }
    // On the CPU the prefetch reader keeps the source's own normalisation.
    PrefetchReader r(ctx, options(2, 2), std::make_unique<deepcam::readers::Hdf5Reader>(ctx, ho));
    CHECK(!r.normalises_on_device());
  }
}

TEST_CASE("a batch the consumer keeps is never overwritten by later batches") {
  TempDir dir;
  const auto ctx = context(2, 2);
  PrefetchReader r(ctx, options(3, 1), std::make_unique<FakeSource>(dir.path, 30, 2, ctx));
  r.start_epoch(Split::Train, 0);
  Batch b;
  REQUIRE(r.next(b));
  const at::Tensor kept = b.data, kept_labels = b.labels;
  const at::Tensor copy = kept.clone(), copy_labels = kept_labels.clone();
  std::int64_t batches = 1;
  while (r.next(b)) ++batches;
  CHECK(batches == 15);
  CHECK(at::equal(kept, copy));
  CHECK(at::equal(kept_labels, copy_labels));
}

TEST_CASE("starting another epoch mid-way drops the read-ahead and serves the new split") {
  TempDir dir;
  const auto ctx = context(2, 2);
  FakeSource reference(dir.path, 20, 7, ctx);
  const Drained val = drain(reference, Split::Validation, 0);
  PrefetchReader r(ctx, options(3, 4), std::make_unique<FakeSource>(dir.path, 20, 7, ctx));
  for (int round = 0; round < 3; ++round) {
    r.start_epoch(Split::Train, round);
    Batch b;
    REQUIRE(r.next(b));
    CHECK(same(drain(r, Split::Validation, 0), val));
  }
}

// One call of a sequence: begin (split, epoch), take `take` batches (-1:
// all, and the end), then, if `settle`, let the workers read ahead as far
// as they will before the next call.
struct Call {
  Split split;
  std::int64_t epoch;
  int take;
  bool settle;
};

// Waits until the source's read count stops changing for 20 ms plus three
// reads' time: the workers have read ahead as far as they may. A read counts
// when it ends, so a quiet time shorter than one read (20 ms at delay_ =
// 20000) returned while reads were still under way. (A worker held up longer
// only sends the next call down the path that waits for its batch, which
// must return the same batches; the read-ahead counts, though, need every
// read done.)
void settle(const FakeSource& fake) {
  const auto quiet = std::chrono::milliseconds(20) + 3 * std::chrono::microseconds(fake.delay_);
  std::int64_t before = -1;
  while (fake.reads_.load() != before) {
    before = fake.reads_.load();
    std::this_thread::sleep_for(quiet);
  }
}

TEST_CASE("every sequence of calls returns exactly the plain reader's batches, read ahead or not") {
  TempDir dir;
  // 21 training samples in batches of 2 (the last has 1), 7 validation
  // samples in batches of 3.
  const auto ctx = context(2, 3);
  FakeSource reference(dir.path, 21, 7, ctx);
  const std::vector<std::pair<const char*, std::vector<Call>>> sequences = {
      {"train e, val, train e+1 (the engine)",
       {{Split::Train, 0, -1, true}, {Split::Validation, 0, -1, true}, {Split::Train, 1, -1, true},
        {Split::Validation, 1, -1, false}, {Split::Train, 2, -1, false}}},
      {"the engine, dropping the last incomplete training batch",
       {{Split::Train, 0, 10, true}, {Split::Validation, 0, -1, true}, {Split::Train, 1, 10, false},
        {Split::Validation, 0, -1, false}, {Split::Train, 2, 10, true}}},
      {"train e, train e+1 (no validation)",
       {{Split::Train, 0, -1, true}, {Split::Train, 1, -1, true}, {Split::Train, 2, -1, false}}},
      {"train e, train e+2 (a skip)", {{Split::Train, 0, -1, true}, {Split::Train, 2, -1, true}}},
      {"validation first (evaluate), then training from epoch 0 and from epoch 4 (a resume)",
       {{Split::Validation, 0, -1, true}, {Split::Train, 0, -1, false}, {Split::Validation, 0, -1, true},
        {Split::Train, 4, -1, true}, {Split::Validation, 0, -1, true}}},
      {"partial epochs abandoned mid-way",
       {{Split::Train, 0, 3, true}, {Split::Validation, 0, 1, true}, {Split::Train, 1, 0, true},
        {Split::Train, 1, 2, false}, {Split::Validation, 0, 2, false}, {Split::Train, 2, -1, true},
        {Split::Train, 2, 5, true}, {Split::Train, 3, -1, true}}},
      {"the same epoch again after its end", {{Split::Train, 5, -1, true}, {Split::Train, 5, -1, true},
                                               {Split::Validation, 0, -1, true}, {Split::Validation, 0, -1, true}}},
  };
  std::map<std::pair<int, std::int64_t>, Drained> plain;
  auto expected = [&](Split s, std::int64_t e) -> const Drained& {
    const auto key = std::make_pair(s == Split::Train ? 0 : 1, e);
    if (!plain.count(key)) plain[key] = drain(reference, s, e);
    return plain[key];
  };
  for (const auto& [name, calls] : sequences) {
    for (int threads : {1, 3}) {
      for (int depth : {1, 2, 5}) {
        INFO(name << ", threads " << threads << " depth " << depth);
        auto source = std::make_unique<FakeSource>(dir.path, 21, 7, ctx);
        const FakeSource* fake = source.get();
        PrefetchReader r(ctx, options(threads, depth), std::move(source));
        for (const Call& call : calls) {
          INFO(deepcam::to_string(call.split) << " epoch " << call.epoch << " take " << call.take);
          const Drained& want = expected(call.split, call.epoch);
          r.start_epoch(call.split, call.epoch);
          Batch b;
          const std::size_t n = call.take < 0 ? want.data.size() : static_cast<std::size_t>(call.take);
          for (std::size_t k = 0; k < n; ++k) {
            REQUIRE(r.next(b));
            CHECK(at::equal(b.data, want.data[k]));
            CHECK(at::equal(b.labels, want.labels[k]));
          }
          if (call.take < 0) CHECK(!r.next(b));
          if (call.settle) settle(*fake);
        }
      }
    }
  }
}

TEST_CASE("the next epochs are read ahead within depth more buffers, and found ready") {
  TempDir dir;
  // 20 training samples in batches of 2, 7 validation samples in batches of
  // 2 (the last has 1); 20 ms per read.
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 20, 7, ctx);
  FakeSource* fake = source.get();
  fake->delay_ = 20000;
  const int depth = 2;
  PrefetchReader r(ctx, options(4, depth), std::move(source));
  auto first_wait = [&](Split s, std::int64_t e, Batch& b) {
    const auto t0 = std::chrono::steady_clock::now();
    r.start_epoch(s, e);
    REQUIRE(r.next(b));
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::set<const void*> buffers;
  {
    Batch b;
    r.start_epoch(Split::Train, 0);
    while (r.next(b)) buffers.insert(b.data.data_ptr());
  }
  settle(*fake);
  // Training epoch 0, then `depth` batches of validation and `depth` of
  // training epoch 1, read ahead.
  CHECK(fake->reads_.load() == 20 + 2 * depth + 2 * depth);
  {
    Batch b;
    const double waited = first_wait(Split::Validation, 0, b);
    INFO("validation's first batch waited " << waited << " s");
    CHECK(waited < 0.015);  // one read takes 20 ms
    buffers.insert(b.data.data_ptr());
    while (r.next(b)) buffers.insert(b.data.data_ptr());
  }
  settle(*fake);
  // All of validation; training epoch 1 still has its `depth` batches.
  CHECK(fake->reads_.load() == 20 + 7 + 2 * depth);
  {
    Batch b;
    const double waited = first_wait(Split::Train, 1, b);
    INFO("training epoch 1's first batch waited " << waited << " s");
    CHECK(waited < 0.015);
    buffers.insert(b.data.data_ptr());
    while (r.next(b)) buffers.insert(b.data.data_ptr());
  }
  settle(*fake);
  CHECK(fake->reads_.load() == 20 + 7 + 20 + 2 * depth + 2 * depth);
  // Neither batch was kept by the consumer: the pool's buffers were reused,
  // never more than 2 * depth + 2 of them.
  CHECK(buffers.size() <= static_cast<std::size_t>(2 * depth + 2));
  CHECK(buffers.size() > static_cast<std::size_t>(depth + 2));
}

TEST_CASE("a run that reads the first N validation samples (--predict --samples N) stages and reads only those") {
  TempDir data, stage;
  ReaderContext ctx = context(2, 1);
  ctx.splits = {Split::Validation};
  ctx.validation_samples = 3;
  auto o = options(3, 2);
  o.stage_dir = stage.path.string();
  auto source = std::make_unique<FakeSource>(data.path, 9, 7, ctx);
  FakeSource* fake = source.get();
  PrefetchReader r(ctx, o, std::move(source));
  CHECK(r.local_samples(Split::Validation) == 3);
  CHECK(r.global_samples(Split::Validation) == 7);  // the split, as the reader's source has it
  std::set<std::string> copies;
  for (const auto& entry : fs::recursive_directory_iterator(r.staging_dir())) {
    if (entry.is_regular_file()) copies.insert(entry.path().filename().string());
  }
  std::set<std::string> first;
  for (std::int64_t i = 0; i < 3; ++i) {
    first.insert(fs::path(fake->sample_files(Split::Validation, i).at(0)).filename().string());
  }
  CHECK(copies == first);
  // The same first three samples as a reader of the whole split gives.
  FakeSource reference(data.path, 9, 7, ctx);
  const Drained all = drain(reference, Split::Validation, 0);  // batches of one sample
  REQUIRE(all.data.size() == 7);
  const Drained first_three{{all.data.begin(), all.data.begin() + 3}, {all.labels.begin(), all.labels.begin() + 3}};
  CHECK(same(drain(r, Split::Validation, 0), first_three));
  settle(*fake);
  CHECK(fake->reads_.load() == 3);
}

TEST_CASE("a run that reads validation only stages and reads ahead nothing of training; one that reads none stages "
          "nothing") {
  TempDir data, stage;
  ReaderContext ctx = context(2, 2);
  ctx.splits = {Split::Validation};  // --evaluate, --predict
  auto o = options(3, 2);
  o.stage_dir = stage.path.string();
  {
    auto source = std::make_unique<FakeSource>(data.path, 9, 4, ctx);
    FakeSource* fake = source.get();
    PrefetchReader r(ctx, o, std::move(source));
    const std::string staged_dir = r.staging_dir();
    std::set<std::string> copies;
    for (const auto& entry : fs::recursive_directory_iterator(staged_dir)) {
      if (entry.is_regular_file()) copies.insert(entry.path().filename().string());
    }
    std::set<std::string> validation;
    for (std::int64_t i = 0; i < fake->sample_count(Split::Validation); ++i) {
      validation.insert(fs::path(fake->sample_files(Split::Validation, i).at(0)).filename().string());
    }
    CHECK(copies == validation);
    FakeSource reference(data.path, 9, 4, ctx);
    CHECK(same(drain(r, Split::Validation, 0), drain(reference, Split::Validation, 0)));
    settle(*fake);
    CHECK(fake->reads_.load() == 4);  // no training epoch read ahead
  }
  ctx.splits = {};  // --benchmark
  PrefetchReader none(ctx, o, std::make_unique<FakeSource>(data.path, 9, 4, ctx));
  CHECK(none.staging_dir().empty());
  CHECK(none.sample_shape() == std::vector<std::int64_t>{kC, kH, kW});
}

TEST_CASE("a failure read ahead is reported only if its epoch is begun, at its batch") {
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 10, 7, ctx);
  FakeSource* fake = source.get();
  fake->fail_at_ = 3;  // validation batch 1
  fake->fail_split_ = "validation";
  PrefetchReader r(ctx, options(3, 3), std::move(source));
  FakeSource reference(dir.path, 10, 7, ctx);
  const Drained own1 = drain(reference, Split::Train, 1);
  drain(r, Split::Train, 0);
  settle(*fake);
  // Validation's failed batch was read ahead; a run that does not validate
  // never sees it.
  CHECK(same(drain(r, Split::Train, 1), own1));
  settle(*fake);
  r.start_epoch(Split::Validation, 0);
  Batch b;
  CHECK(r.next(b));
  CHECK_THROWS_WITH_AS(r.next(b), doctest::Contains("sample-1003.bin: injected failure"), Error);
}

TEST_CASE("a failed sample is reported at its batch, after the batches before it") {
  TempDir dir;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(dir.path, 10, 2, ctx);
  const auto order = deepcam::training_indices(10, 0, 1, 7, 0);
  source->fail_at_ = order[5];  // the second sample of batch 2
  PrefetchReader r(ctx, options(4, 4), std::move(source));
  r.start_epoch(Split::Train, 0);
  Batch b;
  CHECK(r.next(b));
  CHECK(r.next(b));
  CHECK_THROWS_WITH_AS(r.next(b), doctest::Contains("injected failure"), Error);
  // The reader stays usable: the next epoch starts afresh.
  r.start_epoch(Split::Validation, 0);
  CHECK(r.next(b));
}

TEST_CASE("staging copies the rank's samples, checks them, reads them and removes them at exit") {
  TempDir data, stage;
  const auto ctx = context(2, 2);
  std::string staged_dir;
  {
    std::FILE* log_file = std::tmpfile();
    deepcam::MlperfLog log(log_file, true);
    ReaderContext c = ctx;
    c.log = &log;
    auto o = options(3, 2);
    o.stage_dir = stage.path.string();
    auto source = std::make_unique<FakeSource>(data.path, 9, 4, ctx);
    FakeSource* fake = source.get();
    PrefetchReader r(c, o, std::move(source));
    staged_dir = r.staging_dir();
    REQUIRE(!staged_dir.empty());
    CHECK(fs::path(staged_dir).parent_path() == stage.path);
    // Every copy equals its source, byte for byte, under the same name.
    for (Split s : {Split::Train, Split::Validation}) {
      for (std::int64_t i = 0; i < r.sample_count(s); ++i) {
        const auto copy = r.sample_files(s, i).at(0);
        const auto orig = fake->sample_files(s, i).at(0);
        CHECK(copy.rfind(staged_dir, 0) == 0);
        CHECK(fs::path(copy).filename() == fs::path(orig).filename());
        CHECK(read_text(copy) == read_text(orig));
      }
    }
    fake->read_paths_.clear();
    FakeSource reference(data.path, 9, 4, ctx);
    CHECK(same(drain(r, Split::Train, 0), drain(reference, Split::Train, 0)));
    CHECK(same(drain(r, Split::Validation, 0), drain(reference, Split::Validation, 0)));
    // Every sample read (the next training epoch, read ahead, reads the
    // same training files again), and only from the copies.
    for (const auto& p : fake->read_paths_) CHECK(p.rfind(staged_dir, 0) == 0);
    CHECK(std::set<std::string>(fake->read_paths_.begin(), fake->read_paths_.end()).size() == 13);
    // staging_start / staging_stop, in that order, with the count of files.
    std::fflush(log_file);
    std::rewind(log_file);
    std::string text;
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, log_file)) > 0;) text.append(buf, n);
    std::fclose(log_file);
    const auto start = text.find("\"key\": \"staging_start\""), stop = text.find("\"key\": \"staging_stop\"");
    CHECK(start != std::string::npos);
    CHECK(stop != std::string::npos);
    CHECK(start < stop);
    CHECK(text.find("\"staged_files\": 13") != std::string::npos);
  }
  CHECK(!fs::exists(staged_dir));
  CHECK(entries(stage.path).empty());
}

TEST_CASE("staging that fails half-way leaves no copies behind") {
  TempDir data, stage;
  const auto ctx = context(2, 2);
  auto source = std::make_unique<FakeSource>(data.path, 12, 3, ctx);
  // The ninth training file disappears after listing: its copy fails.
  fs::remove(source->sample_files(Split::Train, 8).at(0));
  auto o = options(2, 2);
  o.stage_dir = stage.path.string();
  CHECK_THROWS_WITH_AS(PrefetchReader(ctx, o, std::move(source)),
                       doctest::Contains("sample-1008.bin: cannot open for staging"), Error);
  CHECK(entries(stage.path).empty());

  o.stage_dir = (stage.path / "missing").string();
  o.stage_setting = stage_setting(o.stage_dir);
  const std::string expected = o.stage_setting + ": no such directory";
  CHECK_THROWS_WITH_AS(PrefetchReader(ctx, o, std::make_unique<FakeSource>(data.path, 3, 3, ctx)),
                       doctest::Contains(expected.c_str()), Error);
}

TEST_CASE("a stop request (SIGTERM, SIGINT) ends staging: StopRequested says how far it came, nothing is left") {
  TempDir data, stage;
  const auto ctx = context(2, 2);
  // Withdrawn however the test ends: the request is the process's.
  struct Request {
    Request() { deepcam::record_stop_request(SIGTERM); }
    ~Request() { deepcam::record_stop_request(0); }
  } request;
  auto o = options(2, 2);
  o.stage_dir = stage.path.string();
  std::string message;
  int signal = 0;
  try {
    PrefetchReader r(ctx, o, std::make_unique<FakeSource>(data.path, 12, 3, ctx));
  } catch (const deepcam::StopRequested& e) {
    message = e.what();
    signal = e.signal();
  }
  CHECK(signal == SIGTERM);
  CHECK(message.rfind("staging the train files into " + stage.path.string() + "/deepcam-stage-", 0) == 0);
  CHECK(message.find(" stopped by SIGTERM after 0 of 12 samples") != std::string::npos);
  CHECK(entries(stage.path).empty());

  // One copy, stopped between its chunks: no partial copy stays.
  const std::string big = (data.path / "big.bin").string();
  std::ofstream(big) << std::string(std::size_t{9} << 20, 'b');
  StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
  CHECK_THROWS_WITH_AS(area.copy(big, "train"), (big + ": staging stopped by SIGTERM").c_str(),
                       deepcam::StopRequested);
  CHECK(entries(fs::path(area.dir()) / "train").empty());
}

TEST_CASE("a staging copy that cannot be written (file size limit) is an error naming it, and nothing is left") {
  TempDir data, stage;
  const std::string big = (data.path / "big.bin").string();
  std::ofstream(big) << std::string(200000, 'b');
  // In a child: the file size limit and an ignored SIGXFSZ make write()
  // fail with EFBIG, as a full disk fails with ENOSPC.
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(pipe_fds[0]);
    std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit limit{65536, 65536};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    std::string message = "no error";
    try {
      StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
      area.copy(big, "train");
    } catch (const Error& e) {
      message = e.what();
    }
    (void)!::write(pipe_fds[1], message.data(), message.size());
    ::_exit(0);
  }
  ::close(pipe_fds[1]);
  std::string message;
  char buf[1024];
  for (ssize_t n; (n = ::read(pipe_fds[0], buf, sizeof buf)) > 0;) message.append(buf, static_cast<std::size_t>(n));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(message.find("big.bin: cannot write the staged copy of " + big) != std::string::npos);
  CHECK(message.find("File too large") != std::string::npos);
  CHECK(message.find("point stage_dir at a larger directory") != std::string::npos);
  CHECK(entries(stage.path).empty());
}

TEST_CASE("a staging directory replaced while the run went on is left as it is: what is there now is not ours") {
  TempDir data, stage;
  const std::string sample = (data.path / "sample.bin").string();
  std::ofstream(sample) << std::string(1000, 's');
  std::string dir;
  {
    StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
    dir = area.dir();
    area.copy(sample, "train");
    // The user's: removed, and a file of theirs put at its path.
    fs::remove_all(dir);
    std::ofstream(dir) << "the user's own file";
  }
  REQUIRE(fs::is_regular_file(dir));
  std::ifstream in(dir);
  std::string text;
  std::getline(in, text);
  CHECK(text == "the user's own file");
  fs::remove(dir);
  // Another folder at its path: left too, with what it holds.
  {
    StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
    dir = area.dir();
    fs::remove_all(dir);
    fs::create_directories(fs::path(dir) / "keep");
  }
  CHECK(fs::is_directory(fs::path(dir) / "keep"));
  fs::remove_all(dir);
  // Untouched, it goes as always.
  {
    StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
    dir = area.dir();
    area.copy(sample, "train");
  }
  CHECK(!fs::exists(dir));
}

TEST_CASE("a stage_dir that is no directory is called what it is") {
  TempDir data;
  const std::string file = (data.path / "file").string();
  std::ofstream(file) << "x";
  CHECK_THROWS_WITH_AS(StagingArea(file, "test.toml [reader] stage_dir"),
                       "test.toml [reader] stage_dir: not a directory; give an existing node-local directory such "
                       "as /dev/shm or /tmp",
                       Error);
  CHECK_THROWS_WITH_AS(StagingArea((data.path / "none").string(), "test.toml [reader] stage_dir"),
                       "test.toml [reader] stage_dir: no such directory; give an existing node-local directory such "
                       "as /dev/shm or /tmp",
                       Error);
}

TEST_CASE("staging directories left by runs that are gone are found, live ones are not") {
  TempDir stage;
  pid_t dead = 4194000;
  while (::kill(dead, 0) == 0 || errno != ESRCH) --dead;
  const fs::path gone = stage.path / ("deepcam-stage-" + std::to_string(dead) + "-a1b2c3");
  const fs::path live = stage.path / ("deepcam-stage-" + std::to_string(::getpid()) + "-d4e5f6");
  fs::create_directories(gone / "train");
  fs::create_directories(live);
  fs::create_directories(stage.path / "deepcam-stage-XYZ");
  CHECK(deepcam::readers::leftover_areas(stage.path.string()) == std::vector<std::string>{gone.string()});
  {
    StagingArea area(stage.path.string(), "test.toml [reader] stage_dir");
    CHECK(fs::path(area.dir()).filename().string().rfind("deepcam-stage-" + std::to_string(::getpid()) + "-", 0) == 0);
    CHECK(deepcam::readers::leftover_areas(stage.path.string()).size() == 1);
  }
  // Only reported: another job's data is not ours to remove.
  CHECK(fs::exists(gone / "train"));
  CHECK(fs::exists(live));
}

TEST_CASE("checksum: every byte counts, and chunked equals whole") {
  std::string a(1003, 'a');
  const auto whole = deepcam::readers::checksum(a.data(), a.size());
  CHECK(deepcam::readers::checksum(a.data() + 500, 503, deepcam::readers::checksum(a.data(), 500)) != 0);
  CHECK(deepcam::readers::checksum(a.data() + 496, 507, deepcam::readers::checksum(a.data(), 496)) == whole);
  for (std::size_t i : {0u, 7u, 8u, 1002u}) {
    std::string b = a;
    b[i] = 'b';
    CHECK(deepcam::readers::checksum(b.data(), b.size()) != whole);
  }
}

TEST_CASE("over the HDF5 reader: the same batches as the HDF5 reader's own, and its validation split") {
  TempDir dir;
  const ReaderContext ctx = synth_context(dir.path, {3, 0, 15});
  deepcam::readers::Hdf5ReaderOptions ho;
  ho.threads = 1;
  deepcam::readers::Hdf5Reader own(ctx, ho);
  for (int threads : {1, 3}) {
    PrefetchReader r(ctx, options(threads, 2), std::make_unique<deepcam::readers::Hdf5Reader>(ctx, ho));
    CHECK(r.sample_shape() == std::vector<std::int64_t>{3, 16, 24});
    for (std::int64_t epoch : {0, 1}) CHECK(same(drain(r, Split::Train, epoch), drain(own, Split::Train, epoch)));
    CHECK(same(drain(r, Split::Validation, 0), drain(own, Split::Validation, 0)));
    CHECK(r.global_samples(Split::Train) == own.global_samples(Split::Train));
  }
}

TEST_CASE("node mode, two ranks on a node: the node's shard is staged once, both read it all, removed after both") {
  TempDir data, stage;
  constexpr std::int64_t kTrain = 23, kValidation = 6;
  // Every source first: FakeSource writes the sample files, which must not
  // change once staging has begun.
  std::vector<std::unique_ptr<FakeSource>> sources, plain_sources;
  std::vector<FakeSource*> fakes;
  for (int r = 0; r < 2; ++r) {
    sources.push_back(std::make_unique<FakeSource>(data.path, kTrain, kValidation, node_rank_context(r)));
    fakes.push_back(sources.back().get());
    plain_sources.push_back(std::make_unique<FakeSource>(data.path, kTrain, kValidation, node_rank_context(r)));
  }
  // What each rank reads without staging.
  std::vector<std::map<std::string, Drained>> want(2);
  for (int r = 0; r < 2; ++r) {
    PrefetchReader plain(node_rank_context(r), options(2, 2, ShuffleMode::Node), std::move(plain_sources[r]));
    want[r]["train 0"] = drain(plain, Split::Train, 0);
    want[r]["validation"] = drain(plain, Split::Validation, 0);
    want[r]["train 1"] = drain(plain, Split::Train, 1);
    REQUIRE(!want[r]["train 0"].data.empty());
  }
  REQUIRE(!same(want[0]["train 0"], want[1]["train 0"]));

  ThreadNode node(2);
  std::vector<std::unique_ptr<PrefetchReader>> readers(2);
  std::vector<std::FILE*> logs{std::tmpfile(), std::tmpfile()};
  {
    std::vector<std::unique_ptr<deepcam::MlperfLog>> mlperf;
    for (int r = 0; r < 2; ++r) mlperf.push_back(std::make_unique<deepcam::MlperfLog>(logs[r], true));
    const auto errors = on_ranks(2, [&](int r) {
      ReaderContext c = node_rank_context(r);
      c.node_group = &node.member(r);
      c.log = mlperf[static_cast<std::size_t>(r)].get();
      auto o = options(2, 2, ShuffleMode::Node);
      o.stage_dir = stage.path.string();
      readers[r] = std::make_unique<PrefetchReader>(c, o, std::move(sources[r]));
    });
    for (int r = 0; r < 2; ++r) {
      INFO("node rank " << r);
      REQUIRE(errors[r] == "");
    }
  }
  // The collectives ran on both ranks (two exchanges each).
  CHECK(node.calls(0) == 2);
  CHECK(node.calls(1) == 2);

  // One directory, shared.
  const std::string dir = readers[0]->staging_dir();
  REQUIRE(!dir.empty());
  CHECK(readers[1]->staging_dir() == dir);
  CHECK(entries(stage.path) == std::vector<std::string>{fs::path(dir).filename().string()});
  // Each file copied once: the ranks split the node's shard (here the whole
  // training list) and each copies its own validation samples.
  CHECK(readers[0]->files_copied() > 0);
  CHECK(readers[1]->files_copied() > 0);
  CHECK(readers[0]->files_copied() + readers[1]->files_copied() == kTrain + kValidation);
  std::set<std::string> expected{".users"};
  for (std::int64_t i = 0; i < kTrain; ++i) expected.insert("train/sample-" + std::to_string(1000 + i) + ".bin");
  for (std::int64_t i = 0; i < kValidation; ++i) {
    expected.insert("validation/sample-" + std::to_string(1000 + i) + ".bin");
  }
  CHECK(files_under(dir) == expected);
  // staging_stop counts the node's files, on both ranks.
  for (int r = 0; r < 2; ++r) {
    INFO("node rank " << r);
    const std::string text = read_file(logs[r]);
    CHECK(text.find("\"key\": \"staging_start\"") != std::string::npos);
    CHECK(text.find("\"staged_files\": " + std::to_string(kTrain + kValidation)) != std::string::npos);
  }

  // Every training sample of the node is there for both ranks, equal to its
  // source; each rank's validation samples too.
  for (int r = 0; r < 2; ++r) {
    INFO("node rank " << r);
    for (std::int64_t i = 0; i < kTrain; ++i) {
      const auto copy = readers[r]->sample_files(Split::Train, i).at(0);
      CHECK(copy.rfind(dir + "/train/", 0) == 0);
      CHECK(read_text(copy) == read_text(fakes[r]->sample_files(Split::Train, i).at(0)));
    }
    for (std::int64_t i : deepcam::validation_indices(kValidation, r, 2)) {
      const auto copy = readers[r]->sample_files(Split::Validation, i).at(0);
      CHECK(copy.rfind(dir + "/validation/", 0) == 0);
      CHECK(read_text(copy) == read_text(fakes[r]->sample_files(Split::Validation, i).at(0)));
    }
  }

  // The batches of the plain reader, read from the shared copies only, on
  // both ranks at once; each rank also reads copies the other one made.
  const auto errors = on_ranks(2, [&](int r) {
    fakes[r]->read_paths_.clear();
    PrefetchReader& reader = *readers[r];
    if (!same(drain(reader, Split::Train, 0), want[r]["train 0"])) throw std::runtime_error("train epoch 0 differs");
    if (!same(drain(reader, Split::Validation, 0), want[r]["validation"]))
      throw std::runtime_error("validation differs");
    if (!same(drain(reader, Split::Train, 1), want[r]["train 1"])) throw std::runtime_error("train epoch 1 differs");
  });
  for (int r = 0; r < 2; ++r) {
    INFO("node rank " << r);
    CHECK(errors[r] == "");
    std::set<std::int64_t> parity;
    for (const auto& p : fakes[r]->read_paths_) {
      CHECK(p.rfind(dir + "/", 0) == 0);
      const std::string name = fs::path(p).filename().string();
      if (p.find("/train/") != std::string::npos) parity.insert(std::stoll(name.substr(7, 4)) % 2);
    }
    // Node rank i copied the training files i, i + 2, ...: both kinds read.
    CHECK(parity == std::set<std::int64_t>{0, 1});
  }

  // Gone once both readers are, however their ends interleave.
  on_ranks(2, [&](int r) { readers[r].reset(); });
  CHECK(!fs::exists(dir));
  CHECK(entries(stage.path).empty());
  for (std::FILE* f : logs) std::fclose(f);
}

TEST_CASE("node-shared staging: no rank removes copies that another rank's reader may still read") {
  TempDir data, stage;
  std::vector<std::unique_ptr<FakeSource>> plain_sources;
  for (int r = 0; r < 2; ++r) {
    plain_sources.push_back(std::make_unique<FakeSource>(data.path, 12, 4, node_rank_context(r)));
  }
  std::vector<Drained> want;
  for (int r = 0; r < 2; ++r) {
    PrefetchReader plain(node_rank_context(r), options(2, 2, ShuffleMode::Node), std::move(plain_sources[r]));
    want.push_back(drain(plain, Split::Train, 3));
  }
  auto build = [&](ThreadNode& node, std::chrono::milliseconds release_wait) {
    std::vector<std::unique_ptr<FakeSource>> sources;
    for (int r = 0; r < 2; ++r) sources.push_back(std::make_unique<FakeSource>(data.path, 12, 4, node_rank_context(r)));
    std::vector<std::unique_ptr<PrefetchReader>> readers(2);
    const auto errors = on_ranks(2, [&](int r) {
      ReaderContext c = node_rank_context(r);
      c.node_group = &node.member(r);
      auto o = options(2, 2, ShuffleMode::Node);
      o.stage_dir = stage.path.string();
      o.stage_release_wait = release_wait;
      readers[r] = std::make_unique<PrefetchReader>(c, o, std::move(sources[r]));
    });
    REQUIRE(errors == std::vector<std::string>{"", ""});
    REQUIRE(readers[0]->staging_dir() == readers[1]->staging_dir());
    return readers;
  };

  SUBCASE("node rank 1 goes first: node rank 0 still reads, then removes the directory") {
    ThreadNode node(2);
    auto readers = build(node, std::chrono::milliseconds(10000));
    const std::string dir = readers[0]->staging_dir();
    readers[1].reset();
    CHECK(fs::exists(dir));
    CHECK(same(drain(*readers[0], Split::Train, 3), want[0]));
    readers[0].reset();
    CHECK(!fs::exists(dir));
  }
  SUBCASE("node rank 0 goes first: it waits while node rank 1 still reads, then removes the directory") {
    ThreadNode node(2);
    auto readers = build(node, std::chrono::milliseconds(20000));
    const std::string dir = readers[0]->staging_dir();
    std::atomic<bool> gone{false};
    std::thread rank0([&] {
      readers[0].reset();
      gone = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    CHECK(!gone);
    CHECK(fs::exists(dir));
    CHECK(same(drain(*readers[1], Split::Train, 3), want[1]));
    readers[1].reset();
    rank0.join();
    CHECK(!fs::exists(dir));
  }
  SUBCASE("node rank 0 cannot wait longer: the last rank to let go removes the directory") {
    ThreadNode node(2);
    auto readers = build(node, std::chrono::milliseconds(100));
    const std::string dir = readers[0]->staging_dir();
    readers[0].reset();  // waits 100 ms, then leaves it
    CHECK(fs::exists(dir));
    CHECK(fs::exists(fs::path(dir) / ".orphaned"));
    CHECK(same(drain(*readers[1], Split::Train, 3), want[1]));
    readers[1].reset();
    CHECK(!fs::exists(dir));
  }
  CHECK(entries(stage.path).empty());
}

TEST_CASE("node-shared staging that fails on one rank fails on every rank of the node, and leaves nothing") {
  TempDir data, stage;
  SUBCASE("a copy that fails on node rank 1 names its file on both ranks") {
    std::vector<std::unique_ptr<FakeSource>> sources;
    for (int r = 0; r < 2; ++r) sources.push_back(std::make_unique<FakeSource>(data.path, 12, 4, node_rank_context(r)));
    // Node rank 1 copies the odd training files: the sixth goes missing.
    fs::remove(sources[1]->sample_files(Split::Train, 5).at(0));
    ThreadNode node(2);
    const auto errors = on_ranks(2, [&](int r) {
      ReaderContext c = node_rank_context(r);
      c.node_group = &node.member(r);
      auto o = options(2, 2, ShuffleMode::Node);
      o.stage_dir = stage.path.string();
      o.stage_setting = stage_setting(o.stage_dir);
      PrefetchReader reader(c, o, std::move(sources[r]));
    });
    CHECK(errors[1].find("sample-1005.bin: cannot open for staging") != std::string::npos);
    CHECK(errors[0].find(stage_setting(stage.path.string()) + ": node rank 1 (rank 1) failed copying into the node's "
                         "shared staging directory") != std::string::npos);
    CHECK(errors[0].find("sample-1005.bin: cannot open for staging") != std::string::npos);
  }
  SUBCASE("ranks that would stage different files refuse, naming the setting") {
    std::vector<std::unique_ptr<FakeSource>> sources;
    for (int r = 0; r < 2; ++r) {
      sources.push_back(std::make_unique<FakeSource>(data.path / std::to_string(r), 12, 4, node_rank_context(r)));
    }
    ThreadNode node(2);
    const auto errors = on_ranks(2, [&](int r) {
      ReaderContext c = node_rank_context(r);
      c.node_group = &node.member(r);
      auto o = options(2, 2, ShuffleMode::Node);
      o.stage_dir = stage.path.string();
      o.stage_setting = stage_setting(o.stage_dir);
      PrefetchReader reader(c, o, std::move(sources[r]));
    });
    for (int r = 0; r < 2; ++r) {
      INFO("node rank " << r);
      CHECK(errors[r].find(stage_setting(stage.path.string()) +
                           ": node rank 1 (rank 1) would stage other training files") != std::string::npos);
    }
  }
  SUBCASE("a staging directory that node rank 0 cannot create: both ranks say why") {
    std::vector<std::unique_ptr<FakeSource>> sources;
    for (int r = 0; r < 2; ++r) sources.push_back(std::make_unique<FakeSource>(data.path, 12, 4, node_rank_context(r)));
    ThreadNode node(2);
    const std::string missing = (stage.path / "missing").string();
    const auto errors = on_ranks(2, [&](int r) {
      ReaderContext c = node_rank_context(r);
      c.node_group = &node.member(r);
      auto o = options(2, 2, ShuffleMode::Node);
      o.stage_dir = missing;
      o.stage_setting = stage_setting(missing);
      PrefetchReader reader(c, o, std::move(sources[r]));
    });
    const std::string why = stage_setting(missing) + ": no such directory";
    CHECK(errors[0].find(why) == 0);
    CHECK(errors[1].find("node rank 0 (rank 0) failed preparing") != std::string::npos);
    CHECK(errors[1].find(why) != std::string::npos);
  }
  CHECK(entries(stage.path).empty());
}

TEST_CASE("gpu and global mode, or a node of one rank: each rank stages for itself, without the node group") {
  TempDir data, stage;
  for (ShuffleMode mode : {ShuffleMode::Gpu, ShuffleMode::Global}) {
    INFO(deepcam::to_string(mode));
    ThreadNode node(2);
    std::vector<std::unique_ptr<PrefetchReader>> readers;
    for (int r = 0; r < 2; ++r) {
      ReaderContext c = node_rank_context(r);
      c.node_group = &node.member(r);
      auto o = options(2, 2, mode);
      o.stage_dir = stage.path.string();
      // One after the other: a collective would wait for the other rank.
      readers.push_back(std::make_unique<PrefetchReader>(c, o, std::make_unique<FakeSource>(data.path, 12, 4, c)));
    }
    CHECK(node.calls(0) == 0);
    CHECK(node.calls(1) == 0);
    CHECK(readers[0]->staging_dir() != readers[1]->staging_dir());
    CHECK(entries(stage.path).size() == 2);
    // gpu: each rank's shard of 6; global: all 12. Plus 2 validation each.
    CHECK(readers[0]->files_copied() == (mode == ShuffleMode::Gpu ? 8 : 14));
    readers.clear();
    CHECK(entries(stage.path).empty());
  }
  ThreadNode alone(1);
  ReaderContext c = context(2, 2);
  c.node_group = &alone.member(0);
  auto o = options(2, 2, ShuffleMode::Node);
  o.stage_dir = stage.path.string();
  {
    PrefetchReader r(c, o, std::make_unique<FakeSource>(data.path, 12, 4, c));
    CHECK(alone.calls(0) == 0);
    CHECK(r.files_copied() == 16);
    CHECK(files_under(r.staging_dir()).count(".users") == 0);
  }
  CHECK(entries(stage.path).empty());
}
