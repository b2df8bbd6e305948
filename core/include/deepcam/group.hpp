// A group of ranks that a plugin may communicate over: the BatchNorm group a
// model receives (ModelContext::batchnorm_group) and the ranks of this node a
// reader receives (ReaderContext::node_group). The engine owns the groups and
// keeps them alive for the whole run; a plugin only holds the pointer.
//
// Every call is a collective: each rank of the group must make the same calls
// in the same order. Tensors may live on the CPU or on this rank's GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include "deepcam/export.hpp"

namespace deepcam {

class DEEPCAM_API Group {
 public:
  virtual ~Group();
  // Ranks in the group, and this rank's place among them (0 .. size - 1).
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // Returns when every rank of the group has called it.
  virtual void barrier() = 0;
  // Sums `tensor` over the group's ranks, in place.
  virtual void all_reduce_sum(at::Tensor& tensor) = 0;
  // Every rank's `tensor` (the same shape and dtype on all), stacked in rank
  // order: shape (size(), *tensor.shape).
  virtual at::Tensor all_gather(const at::Tensor& tensor) = 0;
};

}  // namespace deepcam
