// Cuts the optimizer's tensors into launch tables (see multi_tensor.hpp).
// Plain C++ so that the unit test checks the mapping without a GPU.
#include "multi_tensor.hpp"

#include <cstring>

namespace deepcam::fused {

std::vector<TensorTable> make_tables(const std::vector<Entry>& entries, std::int32_t* chunks) {
  std::vector<TensorTable> tables;
  std::int32_t next_slot = 0;
  const auto open_table = [&tables]() -> TensorTable& {
    tables.emplace_back();
    TensorTable& table = tables.back();
    // Unused slots stay zero rather than indeterminate: the whole struct is
    // copied into the kernel's arguments.
    std::memset(&table, 0, sizeof table);
    return table;
  };
  TensorTable* table = entries.empty() ? nullptr : &open_table();
  for (const Entry& entry : entries) {
    const std::int64_t count = (entry.numel + kChunk - 1) / kChunk;
    std::int64_t chunk = 0;
    // An empty tensor still gets an entry: Adam counts its step as PyTorch does.
    do {
      if (table->tensors == kMaxTensors || (count > 0 && table->blocks == kMaxBlocks)) table = &open_table();
      const int at = table->tensors++;
      table->param[at] = entry.param;
      table->grad[at] = entry.grad;
      table->exp_avg[at] = entry.exp_avg;
      table->exp_avg_sq[at] = entry.exp_avg_sq;
      table->step[at] = entry.step;
      table->numel[at] = entry.numel;
      table->chunk_base[at] = next_slot;
      table->first_chunk[at] = static_cast<std::int32_t>(chunk);
      for (; chunk < count && table->blocks < kMaxBlocks; ++chunk) {
        table->block_tensor[table->blocks] = static_cast<std::uint16_t>(at);
        table->block_chunk[table->blocks] = static_cast<std::int32_t>(chunk);
        ++table->blocks;
      }
    } while (chunk < count);
    next_slot += static_cast<std::int32_t>(count);
  }
  *chunks = next_slot;
  return tables;
}

}  // namespace deepcam::fused
