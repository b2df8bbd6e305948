// sgd_steps IN.pt OUT.pt: runs deepcam::optimizers::Sgd on tensors given by
// Python, so that a test can compare it with torch.optim.SGD on the same
// numbers (tests/integration/test_sdk.py does). Not installed.
//
// IN.pt, written by torch.save:
//   {"options": {"lr": float, "momentum": float, "dampening": float,
//                "weight_decay": float, "nesterov": bool},
//    "params": [Tensor, ...],
//    "grads": [[Tensor or None per parameter] per step],
//    "state": an SGD state_dict() to load first, or None}
// OUT.pt, written by torch::pickle_save (Python's torch.load reads it):
//   {"params": [[Tensor per parameter] after each step],
//    "state_dict": the optimizer's state_dict() after the last step}
#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "deepcam/error.hpp"
#include "deepcam/params.hpp"
#include "deepcam/torch_pickle.hpp"
#include "sgd.hpp"

namespace {

const c10::IValue& key(const c10::impl::GenericDict& dict, const std::string& name, const std::string& file) {
  for (const auto& entry : dict) {
    if (entry.key().isString() && entry.key().toStringRef() == name) return entry.value();
  }
  throw deepcam::Error(file + ": no key \"" + name + "\" (see the comment at the top of sgd_steps.cpp)");
}

deepcam::Params options_of(const c10::impl::GenericDict& options, const std::string& file) {
  std::map<std::string, deepcam::ParamValue> values;
  for (const char* name : {"lr", "momentum", "dampening", "weight_decay"}) {
    values[name] = deepcam::ParamValue(key(options, name, file).toDouble());
  }
  values["nesterov"] = deepcam::ParamValue(key(options, "nesterov", file).toBool());
  return deepcam::Params(file + " [\"options\"]", std::move(values));
}

int run(const std::string& in, const std::string& out) {
  const c10::impl::GenericDict input = deepcam::load_torch_save(in).toGenericDict();
  std::vector<at::Tensor> params;
  for (const c10::IValue& p : key(input, "params", in).toListRef()) {
    params.push_back(p.toTensor().clone().requires_grad_(true));
  }
  deepcam::optimizers::Sgd sgd(params, deepcam::optimizers::SgdOptions::from(
                                           options_of(key(input, "options", in).toGenericDict(), in)));
  const c10::IValue& state = key(input, "state", in);
  if (!state.isNone()) sgd.load_state_dict(state);

  c10::impl::GenericList history(c10::AnyType::get());
  for (const c10::IValue& step_grads : key(input, "grads", in).toListRef()) {
    const auto grads = step_grads.toListRef();
    if (grads.size() != params.size()) {
      throw deepcam::Error(in + ": a step has " + std::to_string(grads.size()) + " gradients for " +
                           std::to_string(params.size()) + " parameters");
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (grads[i].isNone()) {
        params[i].mutable_grad().reset();
      } else {
        params[i].mutable_grad() = grads[i].toTensor().clone();
      }
    }
    sgd.step();
    c10::impl::GenericList now(c10::AnyType::get());
    for (const at::Tensor& p : params) now.push_back(p.detach().clone());
    history.push_back(std::move(now));
  }

  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("params", std::move(history));
  result.insert("state_dict", sgd.state_dict());
  const std::vector<char> bytes = torch::jit::pickle_save(result);
  // Written under another name and renamed: a reader never sees half a file.
  const std::string partial = out + ".partial";
  {
    std::ofstream file(partial, std::ios::binary);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!file) throw deepcam::Error(partial + ": cannot write (check the folder exists and is writable)");
  }
  if (std::rename(partial.c_str(), out.c_str()) != 0) {
    std::remove(partial.c_str());
    throw deepcam::Error(out + ": cannot rename " + partial + " to it");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: sgd_steps IN.pt OUT.pt (see the comment at the top of sgd_steps.cpp)\n");
    return 2;
  }
  try {
    return run(argv[1], argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sgd_steps: %s\n", e.what());
    return 1;
  }
}
