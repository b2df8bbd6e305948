#include "plugin_calls.hpp"

#include <ATen/ops/aminmax.h>
#include <fmt/ranges.h>

#include <cstring>
#include <memory>
#include <variant>

#include "deepcam/normalise.hpp"
#include "deepcam/params.hpp"

namespace deepcam {

const NestedPlugin* nested_source(const Params& params) {
  const auto source = params.values().find("source");
  if (source == params.values().end()) return nullptr;
  const auto* nested = std::get_if<std::shared_ptr<const NestedPlugin>>(&source->second);
  return nested ? nested->get() : nullptr;
}

namespace {

thread_local bool libtorch_errors_pass = false;

}  // namespace

LibTorchErrorsPass::LibTorchErrorsPass() : was_(libtorch_errors_pass) { libtorch_errors_pass = true; }

LibTorchErrorsPass::~LibTorchErrorsPass() { libtorch_errors_pass = was_; }

bool libtorch_error_passes(const c10::Error& e) {
  return libtorch_errors_pass || dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr ||
         dynamic_cast<const c10::AcceleratorError*>(&e) != nullptr ||
         dynamic_cast<const c10::DistError*>(&e) != nullptr || cpu_out_of_memory(e);
}

bool cpu_out_of_memory(const c10::Error& e) {
  return std::strstr(e.what_without_backtrace(), "DefaultCPUAllocator: can't allocate memory") != nullptr;
}

std::string tensor_text(const at::Tensor& t) {
  if (!t.defined()) return "(no tensor)";
  const char* name = nullptr;
  switch (t.scalar_type()) {
    case at::kFloat: name = "float32"; break;
    case at::kDouble: name = "float64"; break;
    case at::kHalf: name = "float16"; break;
    case at::kBFloat16: name = "bfloat16"; break;
    case at::kLong: name = "int64"; break;
    case at::kInt: name = "int32"; break;
    case at::kShort: name = "int16"; break;
    case at::kByte: name = "uint8"; break;
    case at::kBool: name = "bool"; break;
    default: name = c10::toString(t.scalar_type());
  }
  return fmt::format("[{}] {}", fmt::join(t.sizes(), ", "), name);
}

std::string or_its_source(const PluginChoice& choice) {
  const NestedPlugin* source = choice.kind == PluginKind::Reader ? nested_source(choice.params) : nullptr;
  return source ? fmt::format(", or in the {} plugin '{}' it reads through ({})", source->kind, source->name,
                              source->path)
                : "";
}

void check_sample_counts(const PluginChoice& choice, const Reader& reader) {
  for (const Split s : {Split::Train, Split::Validation}) {
    const std::int64_t global = in_plugin(choice, [&] { return reader.global_samples(s); });
    const std::int64_t local = in_plugin(choice, [&] { return reader.local_samples(s); });
    if (global < 1 || local < 0 || local > global) {
      throw std::logic_error(fmt::format("{}: the reader plugin '{}' says its {} split has {} samples over all "
                                         "ranks and {} on this rank (a bug in the plugin)",
                                         choice.plugin->path, choice.name, to_string(s), global, local));
    }
  }
}

void check_batch(const PluginChoice& choice, const Batch& batch, Split split, std::int64_t index,
                 std::int64_t channels, const std::vector<std::int64_t>& shape, std::int64_t batch_size, bool full) {
  const at::Tensor& data = batch.data;
  const at::Tensor& labels = batch.labels;
  const bool fits = data.defined() && labels.defined() && data.dim() == 4 && labels.dim() == 3 &&
                    data.scalar_type() == at::kFloat && labels.scalar_type() == at::kLong &&
                    data.size(1) == channels && shape.size() == 3 && data.size(2) == shape[1] &&
                    data.size(3) == shape[2] && labels.size(0) == data.size(0) && labels.size(1) == shape[1] &&
                    labels.size(2) == shape[2] && data.size(0) >= 1 &&
                    (full ? data.size(0) == batch_size : data.size(0) <= batch_size);
  if (fits) return;
  throw std::logic_error(fmt::format(
      "{}: the reader plugin '{}' handed out {} batch {} with data {} and labels {}; the reader interface wants "
      "data (B, {}, {}, {}) float32 and labels (B, {}, {}) int64 with B {} (a bug in the plugin)",
      choice.plugin->path, choice.name, to_string(split), index, tensor_text(data), tensor_text(labels), channels,
      shape.size() == 3 ? shape[1] : -1, shape.size() == 3 ? shape[2] : -1, shape.size() == 3 ? shape[1] : -1,
      shape.size() == 3 ? shape[2] : -1,
      full ? fmt::format("= {} (a training batch: only an epoch's last may be smaller, and it is not read)",
                         batch_size)
           : fmt::format("in 1..{}", batch_size)));
}

void check_classes(const PluginChoice& choice, const at::Tensor& labels, Split split, std::int64_t index) {
  const auto [low, high] = at::aminmax(labels);
  const std::int64_t lo = low.item<std::int64_t>(), hi = high.item<std::int64_t>();
  if (lo >= 0 && hi < kClasses) return;
  throw std::logic_error(fmt::format("{}: the reader plugin '{}' handed out {} batch {} with labels from {} to {}; "
                                     "the classes are 0 (background), 1 (tropical cyclone) and 2 (atmospheric "
                                     "river) (a bug in the plugin{})",
                                     choice.plugin->path, choice.name, to_string(split), index, lo, hi,
                                     or_its_source(choice)));
}

}  // namespace deepcam
