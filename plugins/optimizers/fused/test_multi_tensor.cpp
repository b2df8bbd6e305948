// Unit test of the launch tables (multi_tensor.hpp): how tensors are cut
// into chunks and tables; and of same_layout (fused.hpp), which decides
// whether the kernels may walk a parameter and its gradient or moments in
// step. The kernels themselves are tested by each optimizer's CUDA-vs-CPU
// test when a GPU is present.
#include <ATen/ATen.h>
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "fused.hpp"
#include "multi_tensor.hpp"

using namespace deepcam::fused;

namespace {

// Distinct fake addresses: the tables only carry them.
float* fake(std::uintptr_t n) { return reinterpret_cast<float*>(n * 64); }

Entry entry(std::uintptr_t id, std::int64_t numel) {
  return {fake(id), fake(id + 1000), fake(id + 2000), fake(id + 3000), fake(id + 4000), numel};
}

}  // namespace

TEST_CASE("make_tables maps each block to one chunk of one tensor, in order") {
  // 1 chunk, 3 chunks (the last one partial), empty, exactly 2 chunks.
  const std::vector<Entry> entries = {entry(1, 10), entry(2, 2 * kChunk + 5), entry(3, 0), entry(4, 2 * kChunk)};
  std::int32_t chunks = -1;
  const std::vector<TensorTable> tables = make_tables(entries, &chunks);
  REQUIRE(tables.size() == 1);
  const TensorTable& t = tables[0];
  CHECK(chunks == 6);
  CHECK(t.tensors == 4);
  CHECK(t.blocks == 6);
  const std::vector<int> block_tensor(t.block_tensor, t.block_tensor + t.blocks);
  const std::vector<int> block_chunk(t.block_chunk, t.block_chunk + t.blocks);
  CHECK(block_tensor == std::vector<int>{0, 1, 1, 1, 3, 3});
  CHECK(block_chunk == std::vector<int>{0, 0, 1, 2, 0, 1});
  const std::vector<int> chunk_base(t.chunk_base, t.chunk_base + t.tensors);
  CHECK(chunk_base == std::vector<int>{0, 1, 4, 4});
  CHECK(t.param[1] == fake(2));
  CHECK(t.grad[1] == fake(1002));
  CHECK(t.exp_avg[3] == fake(2004));
  CHECK(t.exp_avg_sq[3] == fake(3004));
  CHECK(t.step[2] == fake(4003));
  CHECK(t.numel[1] == 2 * kChunk + 5);
  for (int i = 0; i < t.tensors; ++i) CHECK(t.first_chunk[i] == 0);
}

TEST_CASE("make_tables opens a new table when the tensor slots run out") {
  std::vector<Entry> entries;
  for (int i = 0; i < kMaxTensors + 3; ++i) entries.push_back(entry(i + 1, 7));
  std::int32_t chunks = 0;
  const std::vector<TensorTable> tables = make_tables(entries, &chunks);
  REQUIRE(tables.size() == 2);
  CHECK(tables[0].tensors == kMaxTensors);
  CHECK(tables[0].blocks == kMaxTensors);
  CHECK(tables[1].tensors == 3);
  CHECK(tables[1].blocks == 3);
  CHECK(tables[1].param[0] == fake(kMaxTensors + 1));
  // Partial-sum slots run on across tables.
  CHECK(tables[1].chunk_base[0] == kMaxTensors);
  CHECK(chunks == kMaxTensors + 3);
}

TEST_CASE("make_tables continues a tensor that does not fit in the next table") {
  // The second tensor needs more blocks than the first table has left.
  const std::int64_t big = static_cast<std::int64_t>(kMaxBlocks) * kChunk;
  const std::vector<Entry> entries = {entry(1, 3 * kChunk), entry(2, big), entry(3, 1)};
  std::int32_t chunks = 0;
  const std::vector<TensorTable> tables = make_tables(entries, &chunks);
  REQUIRE(tables.size() == 2);
  const TensorTable& first = tables[0];
  const TensorTable& second = tables[1];
  CHECK(first.tensors == 2);
  CHECK(first.blocks == kMaxBlocks);
  CHECK(first.first_chunk[1] == 0);
  CHECK(first.block_chunk[kMaxBlocks - 1] == kMaxBlocks - 4);
  // The rest of tensor 2: chunks kMaxBlocks - 3 .. kMaxBlocks - 1, same slots.
  CHECK(second.tensors == 2);
  CHECK(second.param[0] == fake(2));
  CHECK(second.first_chunk[0] == kMaxBlocks - 3);
  CHECK(second.chunk_base[0] == 3);
  CHECK(second.block_tensor[0] == 0);
  CHECK(second.block_chunk[0] == kMaxBlocks - 3);
  CHECK(second.block_chunk[2] == kMaxBlocks - 1);
  CHECK(second.param[1] == fake(3));
  CHECK(second.chunk_base[1] == 3 + kMaxBlocks);
  CHECK(second.blocks == 4);
  CHECK(chunks == 3 + kMaxBlocks + 1);
}

TEST_CASE("make_tables of no tensors is no table") {
  std::int32_t chunks = -1;
  CHECK(make_tables({}, &chunks).empty());
  CHECK(chunks == 0);
}

TEST_CASE("a table fits in the kernel arguments CUDA 12.1+ allows") {
  CHECK(sizeof(TensorTable) + 256 <= 32764);
}

namespace {

// A channels_last convolution weight and its gradient from the
// convolution's backward pass, as the model's parameters get them.
std::pair<at::Tensor, at::Tensor> conv_weight_and_gradient(at::IntArrayRef shape, std::int64_t groups) {
  at::Tensor w = at::randn(shape).contiguous(at::MemoryFormat::ChannelsLast).requires_grad_();
  const at::Tensor x = at::randn({2, shape[1] * groups, 6, 6}).contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<std::int64_t> one{1, 1}, none{0, 0};
  at::conv2d(x, w, at::Tensor(), one, at::IntArrayRef(none), one, groups).sum().backward();
  return {w, w.grad()};
}

}  // namespace

TEST_CASE("same_layout: a channels_last weight and its convolution gradient walk in step") {
  // 1x1 and depthwise weights: the gradient's strides differ from the weight's only along dimensions of size 1,
  // where PyTorch calls both channels_last; a 5x5 weight's gradient has the weight's strides.
  for (const auto& [shape, groups] : std::vector<std::pair<std::vector<std::int64_t>, std::int64_t>>{
           {{4, 3, 1, 1}, 1}, {{4, 1, 3, 3}, 4}, {{8, 3, 5, 5}, 1}}) {
    CAPTURE(at::IntArrayRef(shape));
    const auto [w, g] = conv_weight_and_gradient(shape, groups);
    CHECK(same_layout(w, g));
    CHECK(same_layout(w, at::zeros_like(w, at::MemoryFormat::Preserve)));
  }
  // What the check exists for: strides that differ only along dimensions of size 1, as the 1x1 case's gradient
  // has them with some thread counts and not with others (with one thread its strides are the weight's).
  const at::Tensor w = at::empty_strided({4, 3, 1, 1}, {3, 1, 3, 3});  // the channels_last strides
  const at::Tensor g = at::empty_strided({4, 3, 1, 1}, {3, 1, 1, 1});
  REQUIRE(w.strides() != g.strides());
  CHECK(same_layout(w, g));
}

TEST_CASE("same_layout refuses what the kernels cannot walk in step") {
  const at::Tensor w = at::randn({8, 3, 5, 5}).contiguous(at::MemoryFormat::ChannelsLast);
  CHECK_FALSE(same_layout(w, at::Tensor()));
  CHECK_FALSE(same_layout(w, at::zeros({8, 3, 5, 5})));                        // another order
  CHECK_FALSE(same_layout(w, at::zeros({8, 3, 5, 4}).contiguous(at::MemoryFormat::ChannelsLast)));  // another size
  CHECK_FALSE(same_layout(w, at::zeros_like(w).to(at::kDouble)));             // another dtype
  const at::Tensor v = at::randn({6, 4});
  CHECK_FALSE(same_layout(v, at::zeros({6, 8}).narrow(1, 0, 4)));            // not dense
  CHECK(same_layout(v, at::zeros({6, 4})));
}
