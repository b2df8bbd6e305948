// Writing and reading a state_dict in PyTorch's optimizer layout ({"state": {id: {...}},
// "param_groups": [{..., "params": [ids]}]}), shared by the adam, adamw and
// lamb plugins. Files come from Python's torch.save as often as from us, so
// every check names the entry in PyTorch's terms, e.g. state[3]["exp_avg"];
// the caller (the checkpoint loader) adds the file.
#pragma once

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "hyperparameters.hpp"

namespace deepcam::fused {

// The dict PyTorch's optimizer.state_dict() returns: {"state": state,
// "param_groups": [group with "params": [0 .. parameters - 1] added last]}.
// `group` holds the optimizer's own keys in its own order.
c10::IValue write_state_dict(c10::impl::GenericDict state, c10::impl::GenericDict group,
                             std::size_t parameters);

class StateDictReader {
 public:
  // Messages read "<optimizer> optimizer state: <what> (expected <layout>
  // layout for the same model)".
  StateDictReader(std::string optimizer, std::string layout);

  struct Entry {
    std::size_t parameter;  // position in the optimizer's parameter list
    std::string where;      // "state[7]"
    c10::impl::GenericDict values;
  };
  struct Parsed {
    c10::impl::GenericDict group;  // param_groups[0]
    std::vector<Entry> entries;
  };
  // The checks every optimizer here shares: one group listing as many ids
  // as there are parameters, and a state keyed by those ids (as ints, or as
  // strings from str-keyed formats), mapped to parameters by their position.
  Parsed parse(const c10::IValue& saved, std::size_t parameters) const;

  [[noreturn]] void fail(const std::string& what) const;
  const c10::IValue* find(const c10::impl::GenericDict& dict, const std::string& key) const;
  const c10::IValue& require(const c10::impl::GenericDict& dict, const std::string& key,
                             const std::string& where) const;
  // A number at dict[key]; Python writes 0 for a float as an int, and a
  // step may be a one-element tensor.
  double number(const c10::impl::GenericDict& dict, const std::string& key, const std::string& where) const;
  bool boolean(const c10::impl::GenericDict& dict, const std::string& key, const std::string& where) const;
  // param_groups[0]["betas"], a tuple or list of two numbers.
  std::vector<double> betas(const c10::impl::GenericDict& group) const;
  // The hyper-parameters every optimizer here reads back from its group,
  // all finite, in the ranges their run-file keys have (a resumed run takes
  // them from the file, as PyTorch's load_state_dict does): betas in [0, 1),
  // weight_decay >= 0; but lr >= 0, as PyTorch allows, since a state holds
  // the rate of its last step, which a warmup's first step runs at 0.
  Hyperparameters hyperparameters(const c10::impl::GenericDict& group) const;
  // A group's "eps", when it has one, must be `eps`: SPEC 5 fixes it, and
  // continuing another one's state with ours would give other numbers than
  // PyTorch's load_state_dict (which takes the file's eps).
  void require_eps(const c10::impl::GenericDict& group, double eps) const;
  // A boolean option of PyTorch's optimizer that this one does not offer
  // (Adam's amsgrad, maximize): absent or False, else refused, since
  // PyTorch would continue with it on.
  void require_off(const c10::impl::GenericDict& group, const std::string& key, const std::string& why) const;
  // A step count at dict[key]: a non-negative whole number that fits in an
  // int64 (a number or a one-element tensor).
  std::int64_t count(const c10::impl::GenericDict& dict, const std::string& key, const std::string& where) const;
  // A moment tensor of `param` (parameter number `index`): its shape is
  // checked, its values finite ("exp_avg_sq", a running mean of squares,
  // also not negative), and it is copied onto the parameter's device, dtype
  // and layout, as PyTorch does.
  at::Tensor moment(const Entry& entry, const std::string& key, const at::Tensor& param) const;

 private:
  std::int64_t to_index(const c10::IValue& key, const std::string& where) const;
  std::vector<c10::IValue> to_items(const c10::IValue& value, const std::string& where) const;
  double to_number(const c10::IValue& value, const std::string& where) const;

  std::string optimizer_;
  std::string layout_;
};

}  // namespace deepcam::fused
