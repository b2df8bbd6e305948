// The training batches of an epoch. As the reference's DataLoader
// (drop_last=True), a training epoch reads only whole batches: the samples
// left over after the last whole batch of a rank are not read that epoch.
// The engine and `deepcam-data read` both count and refuse with these, so
// that what read measures is what training reads.
#pragma once

#include <cstdint>
#include <string>

#include "deepcam/config.hpp"
#include "deepcam/export.hpp"

namespace deepcam {

// The whole batches of `batch_size` in a rank's `local_samples`.
inline std::int64_t whole_train_batches(std::int64_t local_samples, std::int64_t batch_size) {
  return local_samples / batch_size;
}

// Why [run] train_batch_size cannot train on a rank with `local_samples`
// training samples (of `global_samples` over `ranks` ranks): an epoch would
// read no whole batch. The message names the key and the largest batch that
// fits; it is empty when one batch fits.
DEEPCAM_API std::string train_batch_refusal(const RunConfig& cfg, std::int64_t local_samples,
                                            std::int64_t global_samples, int rank, int ranks);

}  // namespace deepcam
