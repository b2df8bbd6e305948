#include "deepcam/sharding.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/randperm.h>

#include <algorithm>
#include <random>
#include <utility>

#include "deepcam/error.hpp"

namespace deepcam {

namespace {

// numpy's legacy random_interval: the smallest all-ones mask covering `max`,
// then rejection sampling from the 32-bit MT19937 stream.
std::uint64_t random_interval(std::mt19937& gen, std::uint64_t max) {
  if (max == 0) return 0;
  std::uint64_t mask = max;
  for (int shift = 1; shift <= 32; shift *= 2) mask |= mask >> shift;
  std::uint64_t value;
  if (max <= 0xffffffffULL) {
    do value = gen() & mask; while (value > max);
  } else {
    do {
      const std::uint64_t high = gen();
      value = ((high << 32) | gen()) & mask;
    } while (value > max);
  }
  return value;
}

// The node and gpu modes have no reference order to reproduce, so they use a
// generator whose output the C++ standard fixes (mt19937_64, seed_seq) and
// an unbiased draw that does not depend on the standard library's
// distributions (those differ between implementations): the same order on
// every machine and compiler.
std::uint64_t uniform_below_or_equal(std::mt19937_64& gen, std::uint64_t max) {
  if (max == 0) return 0;
  std::uint64_t mask = max;
  for (int shift = 1; shift <= 32; shift *= 2) mask |= mask >> shift;
  std::uint64_t value;
  do value = gen() & mask; while (value > max);
  return value;
}

// Different purposes get different tags so that, say, round 1's permutation
// and epoch 1's shard permutation are unrelated draws.
enum : std::uint32_t { kRoundTag = 0x726f756e, kEpochTag = 0x65706f63 };

std::mt19937_64 generator(std::uint32_t tag, std::uint64_t seed, std::uint64_t a, std::uint64_t b) {
  std::seed_seq seq{tag,
                    static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                    static_cast<std::uint32_t>(a), static_cast<std::uint32_t>(a >> 32),
                    static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(b >> 32)};
  return std::mt19937_64(seq);
}

template <typename T>
void shuffle(std::vector<T>& items, std::mt19937_64& gen) {
  for (std::size_t i = items.size(); i > 1; --i) {
    const auto j = static_cast<std::size_t>(uniform_below_or_equal(gen, i - 1));
    std::swap(items[i - 1], items[j]);
  }
}

void check_rank(const char* what, int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size)
    throw Error(std::string(what) + ": rank " + std::to_string(rank) + " outside world size " +
                std::to_string(world_size));
}

}  // namespace

const char* to_string(ShuffleMode mode) {
  switch (mode) {
    case ShuffleMode::Global: return "global";
    case ShuffleMode::Node: return "node";
    case ShuffleMode::Gpu: return "gpu";
  }
  return "unknown";
}

ShuffleMode parse_shuffle_mode(const std::string& text, const std::string& setting) {
  for (const ShuffleMode mode : {ShuffleMode::Global, ShuffleMode::Node, ShuffleMode::Gpu}) {
    if (text == to_string(mode)) return mode;
  }
  throw Error(setting + ": no such shuffle mode; use \"global\" (the reference's), \"node\" or \"gpu\"");
}

std::vector<std::int64_t> reference_preshuffle(std::int64_t n) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[i] = i;
  // std::mt19937's integer seeding is MT19937's init_genrand, which is what
  // numpy's RandomState(int) uses; shuffle walks down from the last item.
  std::mt19937 gen(12345);
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(random_interval(gen, static_cast<std::uint64_t>(i)));
    std::swap(order[i], order[j]);
  }
  return order;
}

// The reference's training pipeline, matched step for step:
//  1. its training dataset sorts the file names and shuffles that list once
//     with numpy.random.RandomState(12345) (the dataset's default seed, the
//     same for every run): reference_preshuffle;
//  2. torch.utils.data.DistributedSampler(shuffle=True, drop_last=True) draws
//     torch.randperm(N) from a CPU torch.Generator seeded with
//     sampler_seed + epoch (set_epoch is called every epoch), keeps the
//     first floor(N/P)*P entries and gives rank r entries r, r+P, r+2P, ...
// The reference leaves the sampler's seed at its default 0; here it is the
// run seed (SPEC 2.1: the order is drawn from (seed, epoch)), so a run with
// seed 0 reads the reference's order exactly and any other seed reads the
// reference's order under DistributedSampler(seed=seed).
std::vector<std::int64_t> training_indices(std::int64_t n_files, int rank, int world_size,
                                           std::uint64_t seed, std::int64_t epoch) {
  check_rank("training samples", rank, world_size);
  if (epoch < 0) throw Error("training samples: negative epoch " + std::to_string(epoch));
  const std::vector<std::int64_t> preshuffle = reference_preshuffle(n_files);
  at::Generator generator =
      at::make_generator<at::CPUGeneratorImpl>(seed + static_cast<std::uint64_t>(epoch));
  const at::Tensor permutation = at::randperm(n_files, generator, at::kLong);
  const std::int64_t* perm = permutation.data_ptr<std::int64_t>();
  const std::int64_t per_rank = n_files / world_size;
  std::vector<std::int64_t> indices;
  indices.reserve(static_cast<std::size_t>(per_rank));
  for (std::int64_t k = 0; k < per_rank; ++k)
    indices.push_back(preshuffle[perm[rank + k * world_size]]);
  return indices;
}

std::vector<std::int64_t> validation_indices(std::int64_t n_files, int rank, int world_size) {
  check_rank("validation samples", rank, world_size);
  const std::int64_t block = n_files / world_size;
  std::vector<std::int64_t> indices;
  for (std::int64_t i = rank * block; i < (rank + 1) * block; ++i) indices.push_back(i);
  if (rank < n_files % world_size) indices.push_back(block * world_size + rank);
  return indices;
}

TrainingSharding::TrainingSharding(const ShardingSetup& setup) : setup_(setup) {
  const ShardingSetup& s = setup_;
  check_rank("training samples", s.rank, s.world_size);
  if (s.oversampling_factor < 1)
    throw Error("data_oversampling_factor = " + std::to_string(s.oversampling_factor) +
                ": must be at least 1");
  switch (s.mode) {
    case ShuffleMode::Global:
      // Every epoch already draws from the whole list: there is no shard to
      // oversample.
      if (s.oversampling_factor != 1)
        throw Error("data_oversampling_factor = " + std::to_string(s.oversampling_factor) +
                    " with shuffle_mode = \"global\": oversampling applies to the shards of "
                    "shuffle_mode \"node\" or \"gpu\"; set it to 1 or change the mode");
      shards_ = 1;
      shard_ = 0;
      members_ = s.world_size;
      per_rank_ = s.files / s.world_size;
      break;
    case ShuffleMode::Node:
      if (s.local_size < 1 || s.local_rank < 0 || s.local_rank >= s.local_size ||
          s.world_size % s.local_size != 0 || s.rank % s.local_size != s.local_rank)
        throw Error("shuffle_mode = \"node\": rank " + std::to_string(s.rank) + " of " +
                    std::to_string(s.world_size) + " is local rank " +
                    std::to_string(s.local_rank) + " of " + std::to_string(s.local_size) +
                    "; node mode needs the same number of ranks on every node, numbered "
                    "consecutively per node");
      shards_ = s.world_size / s.local_size;
      shard_ = s.rank / s.local_size;
      members_ = s.local_size;
      per_rank_ = s.files / shards_ / members_;
      break;
    case ShuffleMode::Gpu:
      shards_ = s.world_size;
      shard_ = s.rank;
      members_ = 1;
      per_rank_ = s.files / shards_;
      break;
  }
  if (per_rank_ < 1)
    throw Error(std::to_string(s.files) + " training files for " + std::to_string(s.world_size) +
                " ranks with shuffle_mode = \"" + to_string(s.mode) + "\"" +
                (s.mode == ShuffleMode::Node
                     ? " (" + std::to_string(shards_) + " nodes of " +
                           std::to_string(s.local_size) + " ranks)"
                     : std::string()) +
                ": every rank needs at least one training sample per epoch");
}

std::vector<std::int64_t> TrainingSharding::shard_of_round(std::int64_t round) const {
  const std::int64_t n = setup_.files;
  const std::int64_t base = n / shards_, extra = n % shards_;
  const std::int64_t begin = shard_ * base + std::min<std::int64_t>(shard_, extra);
  const std::int64_t end = begin + base + (shard_ < extra ? 1 : 0);
  std::vector<std::int64_t> list(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) list[i] = i;
  if (round > 0) {
    std::mt19937_64 gen = generator(kRoundTag, setup_.seed, static_cast<std::uint64_t>(round), 0);
    shuffle(list, gen);
  }
  return std::vector<std::int64_t>(list.begin() + begin, list.begin() + end);
}

std::vector<std::int64_t> TrainingSharding::order(std::int64_t epoch) const {
  const ShardingSetup& s = setup_;
  if (epoch < 0) throw Error("training samples: negative epoch " + std::to_string(epoch));
  if (s.mode == ShuffleMode::Global)
    return training_indices(s.files, s.rank, s.world_size, s.seed, epoch);
  std::vector<std::int64_t> shard = shard_of_round(epoch % s.oversampling_factor);
  // Every rank of a node draws the same permutation of the node's shard and
  // takes its own stride of it, so the node's ranks never read the same file
  // in one epoch.
  std::mt19937_64 gen = generator(kEpochTag, s.seed, static_cast<std::uint64_t>(epoch),
                                  static_cast<std::uint64_t>(shard_));
  shuffle(shard, gen);
  const int member = s.mode == ShuffleMode::Node ? s.local_rank : 0;
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(per_rank_));
  for (std::int64_t k = 0; k < per_rank_; ++k) out.push_back(shard[member + k * members_]);
  return out;
}

std::vector<std::int64_t> TrainingSharding::reach() const {
  std::vector<std::int64_t> out;
  if (setup_.mode == ShuffleMode::Global) {
    out.resize(static_cast<std::size_t>(setup_.files));
    for (std::int64_t i = 0; i < setup_.files; ++i) out[i] = i;
    return out;
  }
  for (std::int64_t round = 0; round < setup_.oversampling_factor; ++round) {
    const std::vector<std::int64_t> shard = shard_of_round(round);
    out.insert(out.end(), shard.begin(), shard.end());
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::int64_t TrainingSharding::local_samples() const { return per_rank_; }

std::int64_t TrainingSharding::global_samples() const { return setup_.files; }

}  // namespace deepcam
