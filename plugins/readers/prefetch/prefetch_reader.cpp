#include "prefetch_reader.hpp"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include <errno.h>  // program_invocation_short_name

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <typeinfo>
#include <unordered_map>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/file_reader.hpp"
#include "deepcam/mlperf_log.hpp"
#include "deepcam/stop_request.hpp"
#include "device_copy.hpp"
#include "staging.hpp"

namespace deepcam::readers {

PrefetchOptions PrefetchOptions::from(const Params& params) {
  PrefetchOptions o;
  o.where = params.where();
  o.depth = static_cast<int>(params.integer("depth"));
  o.threads = static_cast<int>(params.integer("threads"));
  o.shuffle_mode = parse_shuffle_mode(params.string("shuffle_mode"), params.setting("shuffle_mode"));
  o.oversampling_factor = params.integer("data_oversampling_factor");
  o.stage_dir = params.string("stage_dir");
  o.stage_setting = params.setting("stage_dir");
  return o;
}

namespace {

int split_id(Split split) { return split == Split::Train ? 0 : 1; }

// The reads of one split's epoch: the current one, whose batches next()
// hands out, or one expected to be begun next, read ahead speculatively.
// Its batches are exactly those a plain reader returns for (split, epoch):
// the order is fixed by the sharding when the stream is made.
struct Stream {
  Split split = Split::Train;
  std::int64_t epoch = 0;
  std::vector<std::int64_t> order;  // sample indices, in reading order
  std::int64_t batch_size = 1;
  std::int64_t batches = 0;
  std::int64_t next_item = 0;       // next position in `order` to read
  std::int64_t consumed = 0;        // batches handed out
  std::int64_t released = 0;        // batches whose slot the consumer gave back
  std::vector<int> slot_of;         // batch -> pool slot holding it; -1: none
  int held = 0;                     // pool slots it owns
  bool discarded = false;           // not wanted: its slots go back as their reads land

  std::int64_t length(std::int64_t k) const {
    return std::min<std::int64_t>(batch_size, static_cast<std::int64_t>(order.size()) - k * batch_size);
  }
  bool exhausted() const { return next_item >= static_cast<std::int64_t>(order.size()); }
  // Batches that have a slot (or had one, before the consumer released it).
  std::int64_t started() const { return (next_item + batch_size - 1) / batch_size; }
  bool is(Split s, std::int64_t e) const {
    // Validation reads the same samples whatever the epoch (SPEC 2.3).
    return split == s && (s == Split::Validation || epoch == e);
  }
};

// One batch buffer of the pool. `batch` of `owner` is the batch it holds or
// is being filled with; it is complete when `filled` reaches the batch's
// length.
struct Slot {
  at::Tensor data;    // (capacity, C, H, W) float32, host (pinned on CUDA)
  at::Tensor labels;  // (capacity, H, W) int64
  Stream* owner = nullptr;  // null: free
  std::int64_t batch = -1;
  std::int64_t filled = 0;
  int pending = 0;          // reads into it taken and not yet landed
  bool ready = false;
  // The first sample of the batch that failed: handed to the consumer when
  // it reaches this batch, not earlier, so that batches before it are used.
  std::exception_ptr failure;
};

// Someone besides the ring still holds the buffer (a batch handed out and
// kept): it must not be overwritten.
bool shared(const at::Tensor& t) { return t.defined() && t.storage().use_count() > 1; }

// One rank's word in an exchange among the node's ranks (node-shared
// staging): whether it succeeded, two numbers, and a text (a directory name
// or an error message). Sent as a fixed-size byte tensor through
// Group::all_gather, which hands every rank every word, so that every rank
// takes the same decision from them.
struct Word {
  bool ok = true;
  std::uint64_t a = 0, b = 0;
  std::string text;
};

constexpr std::int64_t kWordBytes = 8192;  // room for a path (PATH_MAX 4096) or an error message
constexpr std::int64_t kWordHeader = 24;   // status byte, padding, a, b

std::vector<Word> exchange(Group& group, const Word& mine, const std::string& where) {
  at::Tensor t = at::zeros({kWordBytes}, at::kByte);
  auto* p = t.data_ptr<std::uint8_t>();
  p[0] = mine.ok ? 1 : 2;
  std::memcpy(p + 8, &mine.a, sizeof mine.a);
  std::memcpy(p + 16, &mine.b, sizeof mine.b);
  // Zero-terminated: longer messages are cut (paths never are).
  std::memcpy(p + kWordHeader, mine.text.data(),
              std::min<std::size_t>(mine.text.size(), static_cast<std::size_t>(kWordBytes - kWordHeader - 1)));
  const at::Tensor all = group.all_gather(t).cpu().contiguous();
  if (all.dim() != 2 || all.size(0) != group.size() || all.size(1) != kWordBytes || all.scalar_type() != at::kByte) {
    throw Error(fmt::format("{}: the node group's all_gather of {} bytes from {} ranks returned {} elements in {} "
                            "dimensions (a bug in the engine)",
                            where, kWordBytes, group.size(), all.numel(), all.dim()));
  }
  std::vector<Word> words(static_cast<std::size_t>(group.size()));
  for (std::size_t r = 0; r < words.size(); ++r) {
    const auto* q = all.data_ptr<std::uint8_t>() + static_cast<std::int64_t>(r) * kWordBytes;
    Word& w = words[r];
    w.ok = q[0] == 1;
    std::memcpy(&w.a, q + 8, sizeof w.a);
    std::memcpy(&w.b, q + 16, sizeof w.b);
    const auto* text = reinterpret_cast<const char*>(q + kWordHeader);
    w.text.assign(text, ::strnlen(text, static_cast<std::size_t>(kWordBytes - kWordHeader)));
  }
  return words;
}

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an unknown error";
  }
}

}  // namespace

struct PrefetchReader::Impl {
  // Members go in reverse order: the workers stop first, the source's
  // library last.
  std::shared_ptr<const void> keep;
  std::unique_ptr<Reader> source;
  // The source as a file reader when the GPU normalises: the workers then
  // read samples selected but not normalised, (H, W, C). Null otherwise.
  const FileReader* raw_source = nullptr;
  // The source as a file reader when the CPU normalises a channels_last
  // run: the workers then read samples normalised in (H, W, C) order and
  // the batch is a channels_last view. Null otherwise.
  const FileReader* hwc_source = nullptr;
  ReaderContext context;
  PrefetchOptions options;
  std::unique_ptr<TrainingSharding> sharding;
  std::int64_t channels = 0, height = 0, width = 0;
  std::string shape_source;  // the file that fixed the sample shape, when the source is a file reader
  std::unique_ptr<StagingArea> staging;
  std::vector<std::vector<std::string>> staged[2];  // per split, by sample index; empty: not staged
  std::unordered_map<std::string, std::string> origin;  // staged copy -> the file it copies
  std::int64_t files_copied = 0;                    // by this rank, while staging
  std::vector<std::int64_t> validation_order;
  // The current epoch's window: the batch handed out, the one before it
  // (which the training step may still hold) and `depth` read ahead. The
  // pool has `depth` slots more, for the epochs read ahead speculatively.
  const int window;
  const int extra;
  DeviceCopier copier;

  std::mutex mutex;
  std::condition_variable work_cv;   // workers: an item may be taken, or stop
  std::condition_variable ready_cv;  // consumer: a batch is complete
  std::vector<Slot> slots;
  bool stop = false;
  std::unique_ptr<Stream> current;               // begun by start_epoch; null before
  std::vector<std::unique_ptr<Stream>> ahead;    // expected next, most likely first
  std::vector<std::unique_ptr<Stream>> dropped;  // discarded, with reads still landing
  std::int64_t last_train_epoch = -1;
  std::vector<std::thread> workers;

  Impl(const ReaderContext& c, const PrefetchOptions& o, std::unique_ptr<Reader> s, std::shared_ptr<const void> k)
      : keep(std::move(k)),
        source(std::move(s)),
        context(c),
        options(o),
        window(o.depth + 2),
        extra(o.depth),
        copier(c.device, c.local_rank, o.depth + 2 + o.depth, o.where) {}

  std::int64_t sample_elements() const { return channels * height * width; }

  std::vector<std::string> files_of(Split s, std::int64_t index) const {
    const auto& copies = staged[split_id(s)];
    if (copies.empty()) return source->sample_files(s, index);
    if (copies[static_cast<std::size_t>(index)].empty()) {
      throw Error(fmt::format("{} stage_dir: {} sample {} was not staged but is read", options.where, to_string(s),
                              index));
    }
    return copies[static_cast<std::size_t>(index)];
  }

  // The exception being handled, from the source reading `files`. A source
  // names the files it was given, and when staging those are copies that
  // are gone once the run ends: an Error naming one names the user's file
  // instead, the copy beside it (where it was read) at its first mention.
  // Errors of other types are passed on as they are.
  std::exception_ptr naming_sources(const std::vector<std::string>& files) const {
    try {
      throw;
    } catch (const Error& e) {
      if (typeid(e) != typeid(Error)) return std::current_exception();
      std::string message = e.what();
      bool renamed = false;
      for (const auto& copy : files) {
        const auto it = origin.find(copy);
        if (it == origin.end()) continue;
        bool first = true;
        for (std::size_t at = 0; (at = message.find(copy, at)) != std::string::npos;) {
          const std::string name = first ? fmt::format("{} (staged copy {})", it->second, copy) : it->second;
          message.replace(at, copy.size(), name);
          at += name.size();
          first = false;
          renamed = true;
        }
      }
      if (!renamed) return std::current_exception();
      return std::make_exception_ptr(Error(message));
    } catch (...) {
      return std::current_exception();
    }
  }

  // read_sample() of the source on the files of one sample.
  void read(const std::vector<std::string>& files, float* data, std::int64_t* labels) const {
    try {
      if (raw_source) raw_source->read_sample_selected(files, data, labels);
      else if (hwc_source) hwc_source->read_sample_hwc(files, data, labels);
      else source->read_sample(files, data, labels);
    } catch (...) {
      std::rethrow_exception(naming_sources(files));
    }
  }

  // Whether the node's ranks share one staging directory: shuffle_mode
  // "node" (every rank of a node may read the whole node's shard) with more
  // than one rank on the node. Otherwise each rank stages for itself.
  bool reads(Split s) const {
    return std::find(context.splits.begin(), context.splits.end(), s) != context.splits.end();
  }

  bool shares_staging() const {
    return options.shuffle_mode == ShuffleMode::Node && context.node_group != nullptr &&
           context.node_group->size() > 1;
  }

  void stage() {
    const auto t0 = std::chrono::steady_clock::now();
    if (context.log) context.log->start("staging_start");
    std::uint64_t files = 0, bytes = 0;
    if (shares_staging()) {
      stage_shared(files, bytes);
    } else {
      stage_private();
      files = files_copied;
      bytes = staging->bytes();
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (context.log) {
      context.log->end("staging_stop", Json(),
                       {{"staged_files", Json(static_cast<long long>(files))},
                        {"staged_bytes", Json(static_cast<long long>(bytes))},
                        {"staging_rate", Json(seconds > 0 ? static_cast<double>(bytes) / seconds : 0.0)}});
    }
    if (context.rank == 0) {
      const std::string shared =
          shares_staging() ? fmt::format(", one copy for the node's {} ranks", context.node_group->size()) : "";
      // Named as the running tool (deepcam-host, deepcam-data read), as its own lines are.
      std::fprintf(stderr, "%s: staged %llu file%s (%.1f MB) to %s in %.1f s%s\n", program_invocation_short_name,
                   static_cast<unsigned long long>(files), files == 1 ? "" : "s", static_cast<double>(bytes) / 1e6,
                   staging->dir().c_str(), seconds, shared.c_str());
    }
  }

  // This rank's own directory, with everything it may read.
  void stage_private() {
    // Every rank of a node sees the same leftovers there: its first says so.
    staging = std::make_unique<StagingArea>(options.stage_dir, options.stage_setting, context.local_rank == 0);
    const std::pair<Split, std::vector<std::int64_t>> plan[] = {{Split::Train, sharding->reach()},
                                                                {Split::Validation, validation_order}};
    for (const auto& [s, indices] : plan) {
      if (!reads(s)) continue;
      std::vector<std::vector<std::string>> groups;
      for (std::int64_t i : indices) groups.push_back(source->sample_files(s, i));
      auto copies = staging->copy_all(groups, to_string(s), options.threads);
      auto& table = staged[split_id(s)];
      table.assign(static_cast<std::size_t>(source->sample_count(s)), {});
      for (std::size_t n = 0; n < indices.size(); ++n) {
        files_copied += static_cast<std::int64_t>(copies[n].size());
        for (std::size_t f = 0; f < copies[n].size(); ++f) origin.emplace(copies[n][f], groups[n][f]);
        table[static_cast<std::size_t>(indices[n])] = std::move(copies[n]);
      }
    }
  }

  // One directory per node, shared by its ranks (shares_staging()); `files`
  // and `bytes` receive the node's totals.
  //
  // 1. Node-rank 0 creates the directory (StagingArea::create_shared); an
  //    all_gather hands its name to the others, with every rank's checksum
  //    of the training files it would stage (the node's shard: the same on
  //    all of them, or the split below would miss files).
  // 2. The node's ranks split the copying: node-rank i copies the shard's
  //    files i, i + n, i + 2n, ... (n ranks; sorted by name), each on its
  //    own `threads` threads, plus its own validation samples (distinct on
  //    every rank). Not node-rank 0 alone: copying is bound by reads from
  //    the shared file system, and this spreads them over the node's ranks
  //    as when each rank copied everything, at 1/n of the work per rank
  //    (and memory bandwidth, for /dev/shm, over their cores).
  // 3. A second all_gather of the outcomes is the barrier before anyone
  //    reads: no rank has every rank's outcome before every rank has
  //    finished copying, and each copy is renamed into place, checked,
  //    before its rank reports. It also makes every rank fail together when
  //    one could not copy, this rank with its own error, the others naming
  //    the rank and its error.
  // Every rank then reads from all of the node's copies. Both exchanges run
  // on every rank whatever happened before them (errors are caught and sent
  // along), so that no rank waits in a collective that another has left.
  // Who removes the directory and when: staging.hpp.
  void stage_shared(std::uint64_t& files, std::uint64_t& bytes) {
    Group& group = *context.node_group;
    const int me = group.rank(), members = group.size();
    const std::string where = options.stage_setting;
    auto node_rank = [&](std::size_t r) {
      return fmt::format("node rank {} (rank {})", r, context.rank - context.local_rank + static_cast<int>(r));
    };
    const std::vector<std::int64_t> train = reads(Split::Train) ? sharding->reach() : std::vector<std::int64_t>{};
    std::vector<std::vector<std::string>> train_files, validation_files;
    std::exception_ptr error;
    // After an exchange: the same decision on every rank.
    auto agree = [&](const std::vector<Word>& words, const char* doing) {
      if (error) std::rethrow_exception(error);
      for (std::size_t r = 0; r < words.size(); ++r) {
        if (!words[r].ok) {
          const std::string message = fmt::format("{}: {} failed {} the node's shared staging directory: {}", where,
                                                  node_rank(r), doing, words[r].text);
          // A batch system signals every rank: this one stops too, whichever rank's copy it was waiting for.
          if (const int signal = stop_requested()) throw StopRequested(signal, message);
          throw Error(message);
        }
      }
    };

    Word plan;
    try {
      if (me != context.local_rank || members != context.local_size) {
        throw Error(fmt::format("{}: the node group has {} ranks, this one its rank {}, but the reader was told "
                                "local_size {} and local_rank {} (a bug in the engine)",
                                where, members, me, context.local_size, context.local_rank));
      }
      std::uint64_t sum = checksum(options.stage_dir.data(), options.stage_dir.size() + 1);
      for (std::int64_t i : train) {
        train_files.push_back(source->sample_files(Split::Train, i));
        for (const auto& f : train_files.back()) sum = checksum(f.c_str(), f.size() + 1, sum);
      }
      if (reads(Split::Validation)) {
        for (std::int64_t i : validation_order) validation_files.push_back(source->sample_files(Split::Validation, i));
      }
      plan.a = sum;
      if (me == 0) {
        staging = StagingArea::create_shared(options.stage_dir, where, options.stage_release_wait);
        plan.text = staging->dir();
      }
    } catch (...) {
      error = std::current_exception();
      plan.ok = false;
      plan.text = message_of(error);
    }
    const std::vector<Word> plans = exchange(group, plan, where);
    agree(plans, "preparing");
    for (std::size_t r = 1; r < plans.size(); ++r) {
      if (plans[r].a != plans[0].a) {
        throw Error(fmt::format("{}: {} would stage other training files (or into another directory) than node "
                                "rank 0; shuffle_mode \"node\" shares one copy of the node's shard, so every rank "
                                "of a node needs the same data, stage_dir and [reader] settings",
                                where, node_rank(r)));
      }
    }

    Word outcome;
    try {
      if (me != 0) staging = StagingArea::join_shared(plans[0].text, where);
      std::vector<std::vector<std::string>> part;
      for (std::size_t n = static_cast<std::size_t>(me); n < train_files.size(); n += static_cast<std::size_t>(members)) {
        part.push_back(train_files[n]);
      }
      for (const auto& c : staging->copy_all(part, to_string(Split::Train), options.threads)) {
        files_copied += static_cast<std::int64_t>(c.size());
      }
      for (const auto& c : staging->copy_all(validation_files, to_string(Split::Validation), options.threads)) {
        files_copied += static_cast<std::int64_t>(c.size());
      }
      outcome.a = static_cast<std::uint64_t>(files_copied);
      outcome.b = staging->bytes();
    } catch (...) {
      error = std::current_exception();
      outcome.ok = false;
      outcome.text = message_of(error);
    }
    const std::vector<Word> outcomes = exchange(group, outcome, where);
    agree(outcomes, "copying into");

    // The node's copies, whichever rank made them: where copy() put them.
    auto& train_table = staged[split_id(Split::Train)];
    train_table.assign(static_cast<std::size_t>(source->sample_count(Split::Train)), {});
    for (std::size_t n = 0; n < train.size(); ++n) {
      auto& copies = train_table[static_cast<std::size_t>(train[n])];
      for (const auto& f : train_files[n]) {
        copies.push_back(staging->target(f, to_string(Split::Train)));
        origin.emplace(copies.back(), f);
      }
    }
    auto& validation_table = staged[split_id(Split::Validation)];
    validation_table.assign(static_cast<std::size_t>(source->sample_count(Split::Validation)), {});
    for (std::size_t n = 0; n < validation_order.size(); ++n) {
      auto& copies = validation_table[static_cast<std::size_t>(validation_order[n])];
      for (const auto& f : validation_files[n]) {
        copies.push_back(staging->target(f, to_string(Split::Validation)));
        origin.emplace(copies.back(), f);
      }
    }
    for (const Word& w : outcomes) {
      files += w.a;
      bytes += w.b;
    }
  }

  std::unique_ptr<Stream> make_stream(Split s, std::int64_t epoch) const {
    auto st = std::make_unique<Stream>();
    st->split = s;
    st->epoch = epoch;
    st->order = s == Split::Train ? sharding->order(epoch) : validation_order;
    st->batch_size = s == Split::Train ? context.train_batch_size : context.validation_batch_size;
    st->batches = (static_cast<std::int64_t>(st->order.size()) + st->batch_size - 1) / st->batch_size;
    st->slot_of.assign(static_cast<std::size_t>(st->batches), -1);
    return st;
  }

  // Under the lock, as everything below.
  int free_slots() const {
    int n = 0;
    for (const Slot& slot : slots) n += slot.owner == nullptr;
    return n;
  }

  // Slots the current stream may still claim: its window is never taken
  // from it by the streams read ahead.
  std::int64_t current_need() const {
    if (!current) return 0;
    const Stream& c = *current;
    return std::max<std::int64_t>(0, std::min<std::int64_t>(c.released + window, c.batches) - c.started());
  }

  void release_slot(int s) {
    Slot& slot = slots[static_cast<std::size_t>(s)];
    Stream* owner = slot.owner;
    slot.owner = nullptr;
    slot.batch = -1;
    slot.ready = false;
    slot.failure = nullptr;
    if (owner && --owner->held == 0 && owner->discarded) {
      dropped.erase(std::remove_if(dropped.begin(), dropped.end(), [owner](const auto& d) { return d.get() == owner; }),
                    dropped.end());
    }
    work_cv.notify_all();
  }

  // The stream is not wanted: slots without a read in flight go back now,
  // the others when their reads land.
  void discard(std::unique_ptr<Stream> st) {
    st->discarded = true;
    for (int& s : st->slot_of) {
      if (s >= 0 && slots[static_cast<std::size_t>(s)].pending == 0) release_slot(s);
      if (s >= 0 && slots[static_cast<std::size_t>(s)].owner != st.get()) s = -1;
    }
    if (st->held > 0) dropped.push_back(std::move(st));
  }

  bool can_take(const Stream& st, bool speculative) const {
    if (st.exhausted()) return false;
    const std::int64_t k = st.next_item / st.batch_size;
    if (k >= st.released + (speculative ? extra : window)) return false;
    if (st.next_item % st.batch_size != 0) return true;  // its batch has a slot already
    const std::int64_t free = free_slots();
    return speculative ? free - current_need() >= 1 : free >= 1;
  }

  // The stream a worker reads next: the current epoch first; the expected
  // ones only once all of the current epoch's reads are taken, so that they
  // never compete with it for the file system.
  Stream* pick() {
    if (current && can_take(*current, false)) return current.get();
    if (current && !current->exhausted()) return nullptr;
    for (auto& a : ahead) {
      if (can_take(*a, true)) return a.get();
    }
    return nullptr;
  }

  // Claims a free slot for batch k of `st` and makes its buffers ready to
  // receive it. Claimed first: if allocating fails, the batch still
  // completes, failed.
  int claim(Stream& st, std::int64_t k) {
    int s = 0;
    while (slots[static_cast<std::size_t>(s)].owner != nullptr) ++s;
    Slot& slot = slots[static_cast<std::size_t>(s)];
    slot.owner = &st;
    ++st.held;
    st.slot_of[static_cast<std::size_t>(k)] = s;
    slot.batch = k;
    slot.filled = 0;
    slot.pending = 0;
    slot.ready = false;
    slot.failure = nullptr;
    // A whole batch, though no more than the stream's samples, however
    // large the batch size that the run file allows.
    const std::int64_t need = std::min<std::int64_t>(st.batch_size, static_cast<std::int64_t>(st.order.size()));
    const std::int64_t capacity = std::max<std::int64_t>(need, slot.data.defined() ? slot.data.size(0) : 0);
    try {
      if (!slot.data.defined() || slot.data.size(0) < need || shared(slot.data) || shared(slot.labels)) {
        slot.data = copier.host_buffer({capacity, channels, height, width}, at::kFloat);
        slot.labels = copier.host_buffer({capacity, height, width}, at::kLong);
      } else {
        copier.wait_reusable(s);
      }
    } catch (const c10::Error& e) {
      slot.failure = std::make_exception_ptr(allocation_failure(st.split, capacity, e.what_without_backtrace()));
    } catch (const std::bad_alloc&) {
      slot.failure = std::make_exception_ptr(allocation_failure(st.split, capacity, "out of memory"));
    } catch (...) {
      slot.failure = std::current_exception();
    }
    return s;
  }

  // A batch buffer that could not be allocated, as an error that says what
  // it needed and why (the allocator's own message carries a C++ backtrace).
  Error allocation_failure(Split split, std::int64_t samples, const std::string& cause) const {
    const long double bytes = static_cast<long double>(samples) * static_cast<long double>(height) *
                              static_cast<long double>(width) *
                              (static_cast<long double>(channels) * sizeof(float) + sizeof(std::int64_t));
    const std::string declared = shape_source.empty() ? "" : fmt::format(" (as {} declares)", shape_source);
    return Error(fmt::format("{}: a batch of {} samples of shape ({}, {}, {}){} needs {:.0f} bytes ({:.1f} GB), and "
                             "allocating it failed: {}; lower [run] {}_batch_size{}",
                             options.where, samples, channels, height, width, declared, bytes, bytes / 1e9L, cause,
                             to_string(split), shape_source.empty() ? "" : ", or check that file"));
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      Stream* st = nullptr;
      work_cv.wait(lock, [&] { return stop || (st = pick()) != nullptr; });
      if (stop) return;
      const std::int64_t item = st->next_item++;
      const std::int64_t k = item / st->batch_size, j = item % st->batch_size;
      const int s = j == 0 ? claim(*st, k) : st->slot_of[static_cast<std::size_t>(k)];
      Slot& slot = slots[static_cast<std::size_t>(s)];
      std::exception_ptr failure;
      float* data = nullptr;
      std::int64_t* labels = nullptr;
      if (!slot.failure) {
        data = slot.data.data_ptr<float>() + j * sample_elements();
        labels = slot.labels.data_ptr<std::int64_t>() + j * height * width;
      }
      const Split split = st->split;
      const std::int64_t index = st->order[static_cast<std::size_t>(item)];
      ++slot.pending;
      lock.unlock();
      if (data) {
        try {
          read(files_of(split, index), data, labels);
        } catch (...) {
          failure = std::current_exception();
        }
      }
      lock.lock();
      --slot.pending;
      if (st->discarded) {
        if (slot.pending == 0 && slot.owner == st) release_slot(s);
        continue;
      }
      if (failure && !slot.failure) slot.failure = failure;
      if (++slot.filled == st->length(k)) {
        if (!slot.failure) {
          try {
            const std::int64_t n = st->length(k);
            // Raw samples fill the same buffer, each (H, W, C) in its
            // sample's place.
            const at::Tensor data_in = slot.data.narrow(0, 0, n);
            copier.issue(s, raw_source ? data_in.view({n, height, width, channels}) : data_in,
                         slot.labels.narrow(0, 0, n));
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
  // On CUDA over a file reader (hdf5, npy), the GPU normalises: the
  // workers' CPU time goes to decoding only. FileReader is exported by core,
  // so the cast works across the plugins' libraries. Any other source keeps
  // its own read_sample(), normalised on the CPU.
  // With [run] memory_format = "channels_last" the batches are
  // channels_last views of (B, H, W, C) samples, transposed nowhere: on
  // CUDA the GPU normalises them in that order; on the CPU a file reader's
  // read_sample_hwc() does. Over any other source the batches are (B, C, H,
  // W) contiguous, as its read_sample() writes them, and the engine converts.
  const auto* files = dynamic_cast<const FileReader*>(m.source.get());
  if (files) m.shape_source = files->shape_source();
  const bool channels_last = context.memory_format == "channels_last";
  if (m.copier.active() && files) {
    m.copier.normalise_on_device(files->shift(), files->scale(), channels_last);
    m.raw_source = files;
  } else if (files && channels_last) {
    m.hwc_source = files;
  }
  m.validation_order = validation_indices(m.source->sample_count(Split::Validation), context.rank, context.world_size);
  // --predict --samples N: the first N only, staged and read ahead.
  if (context.validation_samples > 0 &&
      context.validation_samples < static_cast<std::int64_t>(m.validation_order.size())) {
    m.validation_order.resize(static_cast<std::size_t>(context.validation_samples));
  }
  if (!options.stage_dir.empty() && !m.context.splits.empty()) m.stage();
  m.slots.resize(static_cast<std::size_t>(m.window + m.extra));
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
  // The epoch read ahead, if it is this one: its batches are kept.
  std::unique_ptr<Stream> next;
  for (auto it = m.ahead.begin(); it != m.ahead.end(); ++it) {
    if ((*it)->is(split, epoch)) {
      next = std::move(*it);
      m.ahead.erase(it);
      break;
    }
  }
  // The old epoch's reads still in flight land in slots that are given back
  // as they land: nothing to wait for here.
  if (m.current) m.discard(std::move(m.current));
  m.current = next ? std::move(next) : m.make_stream(split, epoch);
  if (split == Split::Train) m.last_train_epoch = epoch;
  // What the engine does next: after training epoch e, validation, then
  // training epoch e + 1 (or that at once, when a run does not validate);
  // after validation, the training epoch after the last one begun. Streams
  // already read ahead for one of these are kept, as long as they leave the
  // current epoch its window; the others are discarded.
  std::vector<std::pair<Split, std::int64_t>> expected;
  if (split == Split::Train) expected = {{Split::Validation, 0}, {Split::Train, epoch + 1}};
  else expected = {{Split::Train, m.last_train_epoch + 1}};
  // A run that reads one split (--evaluate, --predict) reads no other ahead.
  expected.erase(std::remove_if(expected.begin(), expected.end(), [&](const auto& e) { return !m.reads(e.first); }),
                 expected.end());
  std::vector<std::unique_ptr<Stream>> kept;
  int held = 0;
  for (const auto& [s, e] : expected) {
    auto it = std::find_if(m.ahead.begin(), m.ahead.end(), [&](const auto& a) { return a && a->is(s, e); });
    if (it != m.ahead.end() && held + (*it)->held <= m.extra) {
      held += (*it)->held;
      kept.push_back(std::move(*it));
    } else {
      kept.push_back(m.make_stream(s, e));
    }
  }
  for (auto& a : m.ahead) {
    if (a) m.discard(std::move(a));
  }
  m.ahead = std::move(kept);
  lock.unlock();
  m.work_cv.notify_all();
}

bool PrefetchReader::next(Batch& batch) {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mutex);
  if (!m.current) throw Error(fmt::format("{}: next() before start_epoch() (a bug in the caller)", m.options.where));
  Stream& st = *m.current;
  // The consumer keeps the batch handed out last; older ones go back.
  if (st.consumed - 1 > st.released) {
    for (std::int64_t k = st.released; k < st.consumed - 1; ++k) {
      m.release_slot(st.slot_of[static_cast<std::size_t>(k)]);
      st.slot_of[static_cast<std::size_t>(k)] = -1;
    }
    st.released = st.consumed - 1;
  }
  if (st.consumed >= st.batches) return false;
  const std::int64_t k = st.consumed;
  m.ready_cv.wait(lock, [&] {
    const int s = st.slot_of[static_cast<std::size_t>(k)];
    return s >= 0 && m.slots[static_cast<std::size_t>(s)].ready;
  });
  const int s = st.slot_of[static_cast<std::size_t>(k)];
  Slot& slot = m.slots[static_cast<std::size_t>(s)];
  if (slot.failure) std::rethrow_exception(slot.failure);
  const std::int64_t n = st.length(k);
  if (m.copier.active()) {
    m.copier.hand_over(s, batch.data, batch.labels);
  } else {
    batch.data = m.hwc_source ? slot.data.narrow(0, 0, n).view({n, m.height, m.width, m.channels}).permute({0, 3, 1, 2})
                              : slot.data.narrow(0, 0, n);
    batch.labels = slot.labels.narrow(0, 0, n);
  }
  ++st.consumed;
  return true;
}

std::int64_t PrefetchReader::sample_count(Split split) const { return impl_->source->sample_count(split); }

std::vector<std::string> PrefetchReader::sample_files(Split split, std::int64_t index) const {
  // A sample of another rank's (or node's) share: its source files hold it
  // too (the engine reads every sample's names to compare the ranks' sets).
  const auto& copies = impl_->staged[split_id(split)];
  if (!copies.empty() && copies[static_cast<std::size_t>(index)].empty()) {
    return impl_->source->sample_files(split, index);
  }
  return impl_->files_of(split, index);
}

std::vector<std::int64_t> PrefetchReader::sample_shape() const { return impl_->source->sample_shape(); }

void PrefetchReader::read_sample(const std::vector<std::string>& files, float* data, std::int64_t* labels) const {
  try {
    impl_->source->read_sample(files, data, labels);
  } catch (...) {
    std::rethrow_exception(impl_->naming_sources(files));
  }
}

bool PrefetchReader::normalises_on_device() const { return impl_->raw_source != nullptr; }

std::string PrefetchReader::staging_dir() const { return impl_->staging ? impl_->staging->dir() : std::string(); }

std::int64_t PrefetchReader::files_copied() const { return impl_->files_copied; }

const std::vector<std::int64_t>& PrefetchReader::epoch_order() const {
  static const std::vector<std::int64_t> none;
  return impl_->current ? impl_->current->order : none;
}

}  // namespace deepcam::readers
