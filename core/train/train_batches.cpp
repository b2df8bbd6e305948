#include "train_batches.hpp"

#include <fmt/format.h>

namespace deepcam {

std::string train_batch_refusal(const RunConfig& cfg, std::int64_t local_samples, std::int64_t global_samples,
                                int rank, int ranks) {
  if (whole_train_batches(local_samples, cfg.run.integer("train_batch_size")) > 0) return {};
  const std::string& root = cfg.data.string("root");
  return fmt::format("{}: more than the {} training samples {}; lower it to at most {}",
                     cfg.run.setting("train_batch_size"), local_samples,
                     ranks == 1 ? fmt::format("in {}", root)
                                : fmt::format("of rank {} (of {} in {}, shared among {} ranks)", rank, global_samples,
                                              root, ranks),
                     local_samples);
}

}  // namespace deepcam
