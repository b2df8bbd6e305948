// Properties of the sample distribution (core/include/deepcam/sharding.hpp)
// over many data set sizes and rank counts: what every reader and every
// staging or prefetching wrapper relies on. The reference's exact global
// order is checked against PyTorch and NumPy in the hdf5 reader's test.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/sharding.hpp"

using deepcam::ShardingSetup;
using deepcam::ShuffleMode;
using deepcam::TrainingSharding;
using Indices = std::vector<std::int64_t>;

namespace {

ShardingSetup setup(std::int64_t n, int rank, int world, ShuffleMode mode, int local_size = 1,
                    std::int64_t factor = 1, std::uint64_t seed = 7) {
  ShardingSetup s;
  s.files = n;
  s.rank = rank;
  s.world_size = world;
  s.local_size = local_size;
  s.local_rank = rank % local_size;
  s.seed = seed;
  s.mode = mode;
  s.oversampling_factor = factor;
  return s;
}

// The contiguous shard `shard` of `shards` over n sorted files, remainder
// files one each to the first shards (SPEC 2.2), written out independently
// of the implementation.
std::set<std::int64_t> contiguous_shard(std::int64_t n, int shards, int shard) {
  std::vector<int> owner;
  for (int s = 0; s < shards; ++s) {
    const std::int64_t size = n / shards + (s < n % shards ? 1 : 0);
    for (std::int64_t k = 0; k < size; ++k) owner.push_back(s);
  }
  std::set<std::int64_t> out;
  for (std::int64_t i = 0; i < n; ++i)
    if (owner[i] == shard) out.insert(i);
  return out;
}

bool within(const Indices& order, const std::set<std::int64_t>& allowed) {
  return std::all_of(order.begin(), order.end(), [&](std::int64_t i) { return allowed.count(i); });
}

}  // namespace

TEST_CASE("validation covers every file exactly once over all ranks, in blocks, unshuffled") {
  for (std::int64_t n = 1; n <= 40; ++n) {
    for (int p = 1; p <= 9; ++p) {
      std::vector<int> seen(static_cast<std::size_t>(n), 0);
      for (int r = 0; r < p; ++r) {
        const Indices v = deepcam::validation_indices(n, r, p);
        CHECK(std::is_sorted(v.begin(), v.end()));
        CHECK(static_cast<std::int64_t>(v.size()) == n / p + (r < n % p ? 1 : 0));
        for (const std::int64_t i : v) ++seen[static_cast<std::size_t>(i)];
        // SPEC 2.3: the block [r q, (r+1) q), then remainder file N - N mod P + r.
        for (std::int64_t k = 0; k < n / p; ++k) CHECK(v[k] == r * (n / p) + k);
      }
      CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
    }
  }
}

// The order itself is pinned against torch.randperm and the reference's pre-shuffle in
// test_hdf5_reader.cpp; here: global mode is that order, in equal disjoint shares.
TEST_CASE("global mode is training_indices' order, in equal disjoint shares") {
  for (std::int64_t n : {1, 2, 5, 16, 17, 63, 100}) {
    for (int p = 1; p <= 8 && p <= n; ++p) {
      for (std::int64_t epoch : {0, 1, 5}) {
        std::set<std::int64_t> all;
        for (int r = 0; r < p; ++r) {
          const TrainingSharding sh(setup(n, r, p, ShuffleMode::Global));
          const Indices order = sh.order(epoch);
          CHECK(order == deepcam::training_indices(n, r, p, 7, epoch));
          CHECK(static_cast<std::int64_t>(order.size()) == n / p);
          CHECK(sh.local_samples() == n / p);
          CHECK(sh.global_samples() == n);  // SPEC 2.1: N, whatever P
          CHECK(static_cast<std::int64_t>(sh.reach().size()) == n);
          all.insert(order.begin(), order.end());
        }
        CHECK(static_cast<std::int64_t>(all.size()) == n / p * p);
      }
    }
  }
}

TEST_CASE("gpu mode permutes each rank's contiguous shard and nothing else") {
  for (std::int64_t n : {1, 3, 8, 17, 50, 101}) {
    for (int p = 1; p <= 9 && p <= n; ++p) {
      for (std::int64_t epoch = 0; epoch < 4; ++epoch) {
        std::set<std::int64_t> all;
        for (int r = 0; r < p; ++r) {
          INFO("n " << n << " p " << p << " rank " << r << " epoch " << epoch);
          const TrainingSharding sh(setup(n, r, p, ShuffleMode::Gpu));
          const std::set<std::int64_t> shard = contiguous_shard(n, p, r);
          const Indices order = sh.order(epoch);
          CHECK(static_cast<std::int64_t>(order.size()) == n / p);
          CHECK(within(order, shard));
          CHECK(std::set<std::int64_t>(order.begin(), order.end()).size() == order.size());
          const Indices reach = sh.reach();
          CHECK(std::set<std::int64_t>(reach.begin(), reach.end()) == shard);
          CHECK(sh.global_samples() == n);  // SPEC 2.1: N, whatever P
          all.insert(order.begin(), order.end());
        }
        CHECK(static_cast<std::int64_t>(all.size()) == n / p * p);
      }
    }
  }
}

TEST_CASE("node mode: a node's ranks share one permuted contiguous shard, disjointly") {
  struct Case { std::int64_t n; int world; int local; };
  for (const Case c : {Case{16, 4, 2}, Case{17, 4, 2}, Case{23, 6, 3}, Case{100, 8, 4},
                       Case{9, 3, 3}, Case{41, 8, 1}}) {
    const int nodes = c.world / c.local;
    const std::int64_t per_rank = c.n / nodes / c.local;
    for (std::int64_t epoch = 0; epoch < 3; ++epoch) {
      std::set<std::int64_t> all;
      for (int r = 0; r < c.world; ++r) {
        INFO("n " << c.n << " world " << c.world << " local " << c.local << " rank " << r);
        const TrainingSharding sh(setup(c.n, r, c.world, ShuffleMode::Node, c.local));
        CHECK(sh.shard_count() == nodes);
        CHECK(sh.shard_id() == r / c.local);
        const std::set<std::int64_t> shard = contiguous_shard(c.n, nodes, r / c.local);
        const Indices order = sh.order(epoch);
        CHECK(static_cast<std::int64_t>(order.size()) == per_rank);
        CHECK(within(order, shard));
        const Indices reach = sh.reach();
        CHECK(std::set<std::int64_t>(reach.begin(), reach.end()) == shard);
        CHECK(sh.global_samples() == c.n);
        for (const std::int64_t i : order) CHECK(all.insert(i).second);  // no file twice
      }
      CHECK(static_cast<std::int64_t>(all.size()) == per_rank * c.world);
    }
  }
}

TEST_CASE("shard orders change with the epoch and the seed, and repeat for the same ones") {
  for (const ShuffleMode mode : {ShuffleMode::Node, ShuffleMode::Gpu}) {
    const TrainingSharding a(setup(400, 1, 4, mode, 2, 1, 3));
    const TrainingSharding b(setup(400, 1, 4, mode, 2, 1, 4));
    CHECK(a.order(0) == TrainingSharding(setup(400, 1, 4, mode, 2, 1, 3)).order(0));
    CHECK(a.order(0) != a.order(1));
    CHECK(a.order(0) != b.order(0));
    // The same files every epoch when F = 1, only their order changes.
    Indices e0 = a.order(0), e1 = a.order(1);
    if (mode == ShuffleMode::Gpu) {
      std::sort(e0.begin(), e0.end());
      std::sort(e1.begin(), e1.end());
      CHECK(e0 == e1);
    }
  }
}

TEST_CASE("over enough epochs every file of a shard is read, the remainder files too") {
  // 10 files on 3 ranks: rank 0 owns 4 files but reads 3 per epoch.
  const TrainingSharding sh(setup(10, 0, 3, ShuffleMode::Gpu));
  std::set<std::int64_t> seen;
  for (std::int64_t epoch = 0; epoch < 20; ++epoch) {
    const Indices order = sh.order(epoch);
    seen.insert(order.begin(), order.end());
  }
  CHECK(seen == std::set<std::int64_t>{0, 1, 2, 3});
}

TEST_CASE("data_oversampling_factor: F shards per rank, cycled over epochs, all within reach") {
  const std::int64_t n = 120;
  for (const std::int64_t factor : {1, 2, 3}) {
    for (const ShuffleMode mode : {ShuffleMode::Gpu, ShuffleMode::Node}) {
      const int world = 6, local = mode == ShuffleMode::Node ? 2 : 1;
      const int shards = world / local;
      for (std::int64_t epoch = 0; epoch < 2 * factor; ++epoch) {
        std::set<std::int64_t> all;
        for (int r = 0; r < world; ++r) {
          INFO("factor " << factor << " mode " << to_string(mode) << " rank " << r);
          const TrainingSharding sh(setup(n, r, world, mode, local, factor));
          const Indices order = sh.order(epoch);
          const Indices reach = sh.reach();
          const std::set<std::int64_t> reachable(reach.begin(), reach.end());
          CHECK(within(order, reachable));
          CHECK(reach.size() <= static_cast<std::size_t>(factor * (n / shards)));
          CHECK(reach.size() >= static_cast<std::size_t>(n / shards));
          // Round 0 is SPEC 2.2's contiguous shard.
          if (epoch % factor == 0) CHECK(within(order, contiguous_shard(n, shards, r / local)));
          // Rounds repeat every F epochs with the same files.
          Indices now = order, later = sh.order(epoch + factor);
          std::sort(now.begin(), now.end());
          std::sort(later.begin(), later.end());
          if (mode == ShuffleMode::Gpu) CHECK(now == later);
          for (const std::int64_t i : order) CHECK(all.insert(i).second);
        }
        CHECK(static_cast<std::int64_t>(all.size()) == n / world * world);
      }
      if (factor > 1) {
        // Another round reads other files: oversampling widens what a rank sees.
        const TrainingSharding sh(setup(n, 0, world, mode, local, factor));
        CHECK(sh.reach().size() > static_cast<std::size_t>(n / shards));
      }
    }
  }
}

TEST_CASE("bad settings are refused with the setting named") {
  using deepcam::Error;
  CHECK_THROWS_WITH_AS(TrainingSharding(setup(10, 0, 2, ShuffleMode::Global, 1, 2)),
                       doctest::Contains("data_oversampling_factor = 2 with shuffle_mode = \"global\""),
                       Error);
  CHECK_THROWS_WITH_AS(TrainingSharding(setup(10, 0, 2, ShuffleMode::Gpu, 1, 0)),
                       doctest::Contains("data_oversampling_factor = 0"), Error);
  CHECK_THROWS_WITH_AS(TrainingSharding(setup(3, 0, 4, ShuffleMode::Gpu)),
                       doctest::Contains("every rank needs at least one training sample"), Error);
  // 5 files for 2 nodes of 3 ranks: a node's 2 files cannot feed 3 ranks.
  CHECK_THROWS_WITH_AS(TrainingSharding(setup(5, 0, 6, ShuffleMode::Node, 3)),
                       doctest::Contains("2 nodes of 3 ranks"), Error);
  CHECK_THROWS_WITH_AS(TrainingSharding(setup(50, 0, 5, ShuffleMode::Node, 2)),
                       doctest::Contains("same number of ranks on every node"), Error);
  CHECK_THROWS_AS(TrainingSharding(setup(10, 2, 2, ShuffleMode::Gpu)), Error);
  CHECK_THROWS_AS(TrainingSharding(setup(10, 0, 2, ShuffleMode::Gpu)).order(-1), Error);
  CHECK_THROWS_WITH_AS(deepcam::parse_shuffle_mode("local", "[reader] shuffle_mode = \"local\""),
                       doctest::Contains("[reader] shuffle_mode = \"local\": no such shuffle mode"),
                       Error);
  CHECK((deepcam::parse_shuffle_mode("node", "x") == ShuffleMode::Node));
  CHECK((deepcam::parse_shuffle_mode("gpu", "x") == ShuffleMode::Gpu));
  CHECK((deepcam::parse_shuffle_mode("global", "x") == ShuffleMode::Global));
}
