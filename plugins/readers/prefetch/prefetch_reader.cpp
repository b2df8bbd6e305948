#include "prefetch_reader.hpp"

#include <ATen/ops/empty.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/mlperf_log.hpp"
#include "device_copy.hpp"
#include "staging.hpp"

namespace deepcam::readers {

PrefetchOptions PrefetchOptions::from(const Params& params) {
  PrefetchOptions o;
  o.where = params.where();
  o.depth = static_cast<int>(params.integer("depth"));
  o.threads = static_cast<int>(params.integer("threads"));
  o.shuffle_mode = parse_shuffle_mode(params.string("shuffle_mode"), params.where() + " shuffle_mode");
  o.oversampling_factor = params.integer("data_oversampling_factor");
  o.stage_dir = params.string("stage_dir");
  return o;
}

namespace {

int split_id(Split split) { return split == Split::Train ? 0 : 1; }

// One batch buffer of the ring. `batch` is the batch it holds or is being
// filled with; it is complete when `filled` reaches the batch's length.
struct Slot {
  at::Tensor data;    // (capacity, C, H, W) float32, host (pinned on CUDA)
  at::Tensor labels;  // (capacity, H, W) int64
  std::int64_t batch = -1;
  std::int64_t filled = 0;
  bool ready = false;
  // The first sample of the batch that failed: handed to the consumer when
  // it reaches this batch, not earlier, so that batches before it are used.
  std::exception_ptr failure;
};

// Someone besides the ring still holds the buffer (a batch handed out and
// kept): it must not be overwritten.
bool shared(const at::Tensor& t) { return t.defined() && t.storage().use_count() > 1; }

}  // namespace

struct PrefetchReader::Impl {
  // Members go in reverse order: the workers stop first, the source's
  // library last.
  std::shared_ptr<const void> keep;
  std::unique_ptr<Reader> source;
  ReaderContext context;
  PrefetchOptions options;
  std::unique_ptr<TrainingSharding> sharding;
  std::int64_t channels = 0, height = 0, width = 0;
  std::unique_ptr<StagingArea> staging;
  std::vector<std::vector<std::string>> staged[2];  // per split, by sample index; empty: not staged
  std::vector<std::int64_t> validation_order;
  DeviceCopier copier;

  std::mutex mutex;
  std::condition_variable work_cv;   // workers: an item may be taken, or stop
  std::condition_variable ready_cv;  // consumer: a batch is complete
  std::condition_variable idle_cv;   // start_epoch: no read in flight
  std::vector<Slot> slots;
  bool stop = false;
  bool active = false;               // an epoch is begun
  std::uint64_t generation = 0;      // bumped by start_epoch: reads of an older epoch are dropped
  Split split = Split::Train;
  std::vector<std::int64_t> order;   // the epoch's sample indices, in reading order
  std::int64_t batch_size = 1;
  std::int64_t batches = 0;
  std::int64_t next_item = 0;        // next position in `order` to read
  std::int64_t consumed = 0;         // batches handed out
  std::int64_t released = 0;         // batches whose slot the consumer gave back
  int in_flight = 0;
  std::vector<std::thread> workers;

  Impl(const ReaderContext& c, const PrefetchOptions& o, std::unique_ptr<Reader> s, std::shared_ptr<const void> k)
      : keep(std::move(k)),
        source(std::move(s)),
        context(c),
        options(o),
        copier(c.device, c.rank, o.depth + 2, o.where) {}

  std::int64_t sample_elements() const { return channels * height * width; }
  std::int64_t batch_length(std::int64_t k) const {
    return std::min<std::int64_t>(batch_size, static_cast<std::int64_t>(order.size()) - k * batch_size);
  }

  std::vector<std::string> files_of(Split s, std::int64_t index) const {
    const auto& copies = staged[split_id(s)];
    if (copies.empty()) return source->sample_files(s, index);
    if (copies[static_cast<std::size_t>(index)].empty()) {
      throw Error(fmt::format("{} stage_dir: {} sample {} was not staged but is read", options.where, to_string(s),
                              index));
    }
    return copies[static_cast<std::size_t>(index)];
  }

  void stage() {
    const auto t0 = std::chrono::steady_clock::now();
    if (context.log) context.log->start("staging_start");
    staging = std::make_unique<StagingArea>(options.stage_dir, options.where + " stage_dir");
    std::size_t files = 0;
    const std::pair<Split, std::vector<std::int64_t>> plan[] = {{Split::Train, sharding->reach()},
                                                                {Split::Validation, validation_order}};
    for (const auto& [s, indices] : plan) {
      std::vector<std::vector<std::string>> groups;
      for (std::int64_t i : indices) groups.push_back(source->sample_files(s, i));
      auto copies = staging->copy_all(groups, to_string(s), options.threads);
      auto& table = staged[split_id(s)];
      table.assign(static_cast<std::size_t>(source->sample_count(s)), {});
      for (std::size_t n = 0; n < indices.size(); ++n) {
        files += copies[n].size();
        table[static_cast<std::size_t>(indices[n])] = std::move(copies[n]);
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const auto bytes = staging->bytes();
    if (context.log) {
      context.log->end("staging_stop", Json(),
                       {{"staged_files", Json(static_cast<long long>(files))},
                        {"staged_bytes", Json(static_cast<long long>(bytes))},
                        {"staging_rate", Json(seconds > 0 ? static_cast<double>(bytes) / seconds : 0.0)}});
    }
    if (context.rank == 0) {
      std::fprintf(stderr, "deepcam-host: staged %zu files (%.1f MB) to %s in %.1f s\n", files,
                   static_cast<double>(bytes) / 1e6, staging->dir().c_str(), seconds);
    }
  }

  bool can_take() const {
    return active && next_item < static_cast<std::int64_t>(order.size()) &&
           next_item / batch_size < released + static_cast<std::int64_t>(slots.size());
  }

  // Makes slot `s` ready to receive batch k; under the lock.
  void prepare(int s, std::int64_t k) {
    Slot& slot = slots[static_cast<std::size_t>(s)];
    // Claimed first: if allocating fails, the batch still completes, failed.
    slot.batch = k;
    slot.filled = 0;
    slot.ready = false;
    slot.failure = nullptr;
    if (!slot.data.defined() || slot.data.size(0) < batch_size || shared(slot.data) || shared(slot.labels)) {
      const std::int64_t capacity = std::max<std::int64_t>(batch_size, slot.data.defined() ? slot.data.size(0) : 0);
      slot.data = copier.host_buffer({capacity, channels, height, width}, at::kFloat);
      slot.labels = copier.host_buffer({capacity, height, width}, at::kLong);
    } else {
      copier.wait_reusable(s);
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      work_cv.wait(lock, [this] { return stop || can_take(); });
      if (stop) return;
      const std::int64_t item = next_item++;
      const std::int64_t k = item / batch_size, j = item % batch_size;
      const int s = static_cast<int>(k % static_cast<std::int64_t>(slots.size()));
      Slot& slot = slots[static_cast<std::size_t>(s)];
      std::exception_ptr failure;
      float* data = nullptr;
      std::int64_t* labels = nullptr;
      try {
        if (j == 0) prepare(s, k);
        data = slot.data.data_ptr<float>() + j * sample_elements();
        labels = slot.labels.data_ptr<std::int64_t>() + j * height * width;
      } catch (...) {
        failure = std::current_exception();
      }
      const std::uint64_t epoch = generation;
      const Split s_split = split;
      const std::int64_t index = order[static_cast<std::size_t>(item)];
      ++in_flight;
      lock.unlock();
      if (!failure) {
        try {
          source->read_sample(files_of(s_split, index), data, labels);
        } catch (...) {
          failure = std::current_exception();
        }
      }
      lock.lock();
      if (--in_flight == 0) idle_cv.notify_all();
      if (epoch != generation) continue;  // start_epoch dropped this epoch
      if (failure && !slot.failure) slot.failure = failure;
      if (++slot.filled == batch_length(k)) {
        if (!slot.failure) {
          try {
            const std::int64_t n = batch_length(k);
            copier.issue(s, slot.data.narrow(0, 0, n), slot.labels.narrow(0, 0, n));
          } catch (...) {
            slot.failure = std::current_exception();
          }
        }
        slot.ready = true;
        ready_cv.notify_all();
      }
    }
  }
};

PrefetchReader::PrefetchReader(const ReaderContext& context, const PrefetchOptions& options,
                               std::unique_ptr<Reader> source, std::shared_ptr<const void> keep)
    : impl_(std::make_unique<Impl>(context, options, std::move(source), std::move(keep))) {
  Impl& m = *impl_;
  if (!m.source) throw Error(fmt::format("{} source: the source reader's factory returned nothing", options.where));
  const auto shape = m.source->sample_shape();
  if (shape.size() != 3) {
    throw Error(fmt::format("{} source: the source reader reports a sample shape of {} dimensions, not (C, H, W)",
                            options.where, shape.size()));
  }
  m.channels = shape[0];
  m.height = shape[1];
  m.width = shape[2];
  ShardingSetup setup;
  setup.files = m.source->sample_count(Split::Train);
  setup.rank = context.rank;
  setup.world_size = context.world_size;
  setup.local_rank = context.local_rank;
  setup.local_size = context.local_size;
  setup.seed = context.seed;
  setup.mode = options.shuffle_mode;
  setup.oversampling_factor = options.oversampling_factor;
  try {
    m.sharding = std::make_unique<TrainingSharding>(setup);
  } catch (const Error& e) {
    // The sharding names the setting; the file and table are ours.
    throw Error(fmt::format("{} {}", options.where, e.what()));
  }
  m.validation_order = validation_indices(m.source->sample_count(Split::Validation), context.rank, context.world_size);
  if (!options.stage_dir.empty()) m.stage();
  // Two slots besides the read-ahead: the batch being handed out and the one
  // before it, which the training step may still hold.
  m.slots.resize(static_cast<std::size_t>(options.depth) + 2);
  try {
    for (int t = 0; t < options.threads; ++t) m.workers.emplace_back([&m] { m.work(); });
  } catch (const std::system_error& e) {
    stop_workers();
    throw Error(fmt::format("{} threads: cannot start {} worker threads: {}", options.where, options.threads,
                            e.what()));
  }
}

void PrefetchReader::stop_workers() {
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    m.stop = true;
    m.active = false;
  }
  m.work_cv.notify_all();
  for (auto& t : m.workers) t.join();
  m.workers.clear();
}

PrefetchReader::~PrefetchReader() { stop_workers(); }

std::int64_t PrefetchReader::global_samples(Split split) const {
  return split == Split::Train ? impl_->sharding->global_samples() : impl_->source->sample_count(Split::Validation);
}

std::int64_t PrefetchReader::local_samples(Split split) const {
  return split == Split::Train ? impl_->sharding->local_samples()
                               : static_cast<std::int64_t>(impl_->validation_order.size());
}

void PrefetchReader::start_epoch(Split split, std::int64_t epoch) {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mutex);
  ++m.generation;
  m.active = false;
  // Reads of the old epoch still write into slots: let them land first.
  m.idle_cv.wait(lock, [&m] { return m.in_flight == 0; });
  m.split = split;
  m.order = split == Split::Train ? m.sharding->order(epoch) : m.validation_order;
  m.batch_size = split == Split::Train ? m.context.train_batch_size : m.context.validation_batch_size;
  m.batches = (static_cast<std::int64_t>(m.order.size()) + m.batch_size - 1) / m.batch_size;
  m.next_item = m.consumed = m.released = 0;
  for (auto& slot : m.slots) {
    slot.batch = -1;
    slot.filled = 0;
    slot.ready = false;
    slot.failure = nullptr;
  }
  m.active = true;
  lock.unlock();
  m.work_cv.notify_all();
}

bool PrefetchReader::next(Batch& batch) {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mutex);
  if (!m.active) throw Error(fmt::format("{}: next() before start_epoch() (a bug in the caller)", m.options.where));
  // The consumer keeps the batch handed out last; older ones go back.
  if (m.consumed - 1 > m.released) {
    m.released = m.consumed - 1;
    m.work_cv.notify_all();
  }
  if (m.consumed >= m.batches) return false;
  const std::int64_t k = m.consumed;
  const int s = static_cast<int>(k % static_cast<std::int64_t>(m.slots.size()));
  Slot& slot = m.slots[static_cast<std::size_t>(s)];
  m.ready_cv.wait(lock, [&] { return slot.batch == k && slot.ready; });
  if (slot.failure) std::rethrow_exception(slot.failure);
  const std::int64_t n = m.batch_length(k);
  if (m.copier.active()) {
    m.copier.hand_over(s, batch.data, batch.labels);
  } else {
    batch.data = slot.data.narrow(0, 0, n);
    batch.labels = slot.labels.narrow(0, 0, n);
  }
  ++m.consumed;
  return true;
}

std::int64_t PrefetchReader::sample_count(Split split) const { return impl_->source->sample_count(split); }

std::vector<std::string> PrefetchReader::sample_files(Split split, std::int64_t index) const {
  return impl_->files_of(split, index);
}

std::vector<std::int64_t> PrefetchReader::sample_shape() const { return impl_->source->sample_shape(); }

void PrefetchReader::read_sample(const std::vector<std::string>& files, float* data, std::int64_t* labels) const {
  impl_->source->read_sample(files, data, labels);
}

std::string PrefetchReader::staging_dir() const { return impl_->staging ? impl_->staging->dir() : std::string(); }

const std::vector<std::int64_t>& PrefetchReader::epoch_order() const { return impl_->order; }

}  // namespace deepcam::readers
