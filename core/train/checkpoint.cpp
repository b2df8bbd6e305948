#include "deepcam/checkpoint.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "deepcam/error.hpp"
#include "deepcam/optimizer.hpp"
#include "deepcam/torch_pickle.hpp"

namespace deepcam {

std::vector<std::pair<std::string, at::Tensor>> state_entries(torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : module.named_modules()) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      out.emplace_back(prefix + p.key(), p.value());
    }
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false)) {
      out.emplace_back(prefix + b.key(), b.value());
    }
  }
  return out;
}

namespace {

// torch::pickle_save tags every dict with its element types through
// torch.jit._pickle.restore_type_tag, which torch.load(weights_only=True), the
// default since PyTorch 2.6, refuses. The same archive without the tags holds
// only what torch.save itself writes: dicts, lists, tuples, numbers, strings
// and tensors rebuilt by torch._utils._rebuild_tensor_v2.
std::vector<char> pickle_for_python(const c10::IValue& value) {
  std::vector<char> pickled;
  torch::jit::Pickler pickler(
      [&](const char* buf, size_t n) { pickled.insert(pickled.end(), buf, buf + n); }, nullptr, nullptr,
      nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();
  std::vector<char> archive;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    archive.insert(archive.end(), c, c + n);
    return n;
  });
  torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(), writer);
  writer.writeEndOfFile();
  return archive;
}

}  // namespace

void save_checkpoint(const std::string& path, const CheckpointInfo& info, torch::nn::Module& model,
                     const Optimizer* optimizer) {
  c10::impl::GenericDict model_state(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [name, tensor] : state_entries(model)) {
    model_state.insert(name, tensor.detach().to(torch::kCPU));
  }
  c10::impl::GenericDict top(c10::StringType::get(), c10::AnyType::get());
  top.insert("step", info.step);
  top.insert("epoch", info.epoch);
  top.insert("model", model_state);
  if (optimizer) top.insert("optimizer", optimizer->state_dict());
  if (info.scaler) {
    // The keys and types of GradScaler.state_dict().
    c10::impl::GenericDict scaler(c10::StringType::get(), c10::AnyType::get());
    scaler.insert("scale", info.scaler->scale);
    scaler.insert("growth_factor", info.scaler->growth_factor);
    scaler.insert("backoff_factor", info.scaler->backoff_factor);
    scaler.insert("growth_interval", info.scaler->growth_interval);
    scaler.insert("_growth_tracker", info.scaler->growth_tracker);
    top.insert("scaler", scaler);
  }
  const std::vector<char> bytes = pickle_for_python(top);

  const std::string tmp = fmt::format("{}.tmp-{}", path, ::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      std::remove(tmp.c_str());
      throw Error(fmt::format("{}: cannot write checkpoint (disk full or not writable?)", tmp));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw Error(fmt::format("{}: cannot rename into place: {}", path, ec.message()));
  }
}

namespace {
std::int64_t as_int(const c10::IValue& v, const std::string& path, const char* key) {
  if (v.isInt()) return v.toInt();
  if (v.isTensor()) return v.toTensor().item<std::int64_t>();
  if (v.isDouble()) return static_cast<std::int64_t>(v.toDouble());
  throw Error(fmt::format("{}: '{}' is not a number", path, key));
}
}  // namespace

CheckpointInfo load_checkpoint(const std::string& path, torch::nn::Module& model, Optimizer* optimizer) {
  // Our own reader: the reference's files hold OrderedDicts, which
  // torch::pickle_load cannot read.
  const c10::IValue top = load_torch_save(path);
  if (!top.isGenericDict()) throw Error(fmt::format("{}: expected a dict at the top level", path));
  const auto dict = top.toGenericDict();
  auto find = [&](const char* key) -> c10::optional<c10::IValue> {
    for (const auto& e : dict) {
      if (e.key().isString() && e.key().toStringRef() == key) return e.value();
    }
    return c10::nullopt;
  };
  const auto model_state = find("model");
  if (!model_state || !model_state->isGenericDict()) {
    throw Error(fmt::format("{}: no 'model' state dict", path));
  }
  std::map<std::string, at::Tensor> stored;
  for (const auto& e : model_state->toGenericDict()) {
    if (!e.key().isString() || !e.value().isTensor()) {
      throw Error(fmt::format("{}: 'model' must map names to tensors", path));
    }
    stored[e.key().toStringRef()] = e.value().toTensor();
  }
  const auto entries = state_entries(model);
  for (const auto& [name, tensor] : entries) {
    auto it = stored.find(name);
    if (it == stored.end()) throw Error(fmt::format("{}: model entry '{}' is missing", path, name));
    if (it->second.sizes() != tensor.sizes() || it->second.scalar_type() != tensor.scalar_type()) {
      throw Error(fmt::format("{}: model entry '{}' has shape {} {}, the model has {} {}", path, name,
                              fmt::join(it->second.sizes(), "x"), c10::toString(it->second.scalar_type()),
                              fmt::join(tensor.sizes(), "x"), c10::toString(tensor.scalar_type())));
    }
  }
  if (stored.size() != entries.size()) {
    for (const auto& [name, t] : stored) {
      bool known = false;
      for (const auto& e : entries) known = known || e.first == name;
      if (!known) throw Error(fmt::format("{}: entry '{}' is not in this model", path, name));
    }
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, tensor] : entries) tensor.copy_(stored[name]);
  }
  CheckpointInfo info;
  if (auto s = find("step")) info.step = as_int(*s, path, "step");
  if (auto e = find("epoch")) info.epoch = as_int(*e, path, "epoch");
  if (optimizer) {
    if (auto o = find("optimizer")) optimizer->load_state_dict(*o);
  }
  if (auto sc = find("scaler")) {
    if (!sc->isGenericDict()) throw Error(fmt::format("{}: 'scaler' is not a dict", path));
    const auto d = sc->toGenericDict();
    auto field = [&](const char* key) -> c10::IValue {
      for (const auto& e : d) {
        if (e.key().isString() && e.key().toStringRef() == key) return e.value();
      }
      throw Error(fmt::format("{}: 'scaler' has no '{}'", path, key));
    };
    auto number = [&](const char* key) {
      const c10::IValue v = field(key);
      if (v.isDouble()) return v.toDouble();
      if (v.isInt()) return static_cast<double>(v.toInt());
      throw Error(fmt::format("{}: scaler '{}' is not a number", path, key));
    };
    ScalerState s;
    s.scale = number("scale");
    s.growth_factor = number("growth_factor");
    s.backoff_factor = number("backoff_factor");
    s.growth_interval = as_int(field("growth_interval"), path, "scaler growth_interval");
    s.growth_tracker = as_int(field("_growth_tracker"), path, "scaler _growth_tracker");
    info.scaler = s;
  }
  return info;
}

}  // namespace deepcam
