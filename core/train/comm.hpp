// Communication between the ranks of a run, on LibTorch's c10d: a Gloo
// process group for CPU tensors and, on CUDA, an NCCL one for GPU tensors,
// met through a c10d store (TCPStore hosted by rank 0, or a FileStore).
//
// A rank that dies or stops answering must not leave the others waiting
// forever: every collective has [run] comm_timeout_s, and a watchdog thread
// keeps a heartbeat per rank in the store, so that the rank that notices a
// failure can name the rank that was lost (RankLost, deepcam/engine.hpp).
//
// One rank (world size 1) needs no store and no process group: every
// operation is then local, unless CommOptions::group_of_one asks for one.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "deepcam/engine.hpp"
#include "deepcam/error.hpp"
#include "deepcam/export.hpp"
#include "deepcam/group.hpp"
#include "ranks.hpp"

namespace deepcam {

struct CommOptions {
  std::string rendezvous = "env";  // "env" | "tcp://HOST:PORT" | "file:///PATH"
  // Where the setting came from, with its value, for messages (Params::setting).
  std::string rendezvous_setting;
  std::chrono::milliseconds timeout{1800 * 1000};
  std::string timeout_where;
  bool cuda = false;               // also an NCCL group for this rank's GPU
  // A store and process groups also at world size 1, so that collectives go
  // through Gloo and NCCL as on many ranks (the data-parallel probe's way to
  // check NCCL on a machine with one GPU, where NCCL refuses two ranks).
  bool group_of_one = false;
};

class DEEPCAM_API Communicator {
 public:
  // Meets the other ranks (blocks until all have arrived or the timeout).
  Communicator(const RankLayout& layout, const CommOptions& options);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int size() const;
  // This rank's place on its node, from the launcher or from host names.
  int local_rank() const;
  int local_size() const;
  // Distinct hosts over all ranks, and the most ranks on one of them.
  int nodes() const;
  int max_local_size() const;
  // The host name rank `rank` met with (its node's: local ranks share it).
  std::string host(int rank) const;

  Group& world();
  // The ranks on this node.
  Group& node();
  // Consecutive ranks r - r % n .. r - r % n + n - 1; n must divide size().
  // Made by the first call, which every rank must make.
  Group& consecutive(int n);
  // The c10d backend the world's collectives on `device` tensors go
  // through ("gloo", "nccl"), or "" where they are local (one rank).
  std::string backend(c10::DeviceType device) const;

  // Starts a sum of `flat` (contiguous) over all ranks, in place.
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void wait() = 0;
  };
  std::unique_ptr<Pending> all_reduce_sum_async(at::Tensor& flat);

  // Overwrites every tensor with rank 0's (one collective per dtype).
  void broadcast_from_rank0(const std::vector<at::Tensor>& tensors);

  // The normal end: waits for every rank, then stops the heartbeat, so that
  // ranks ending one after another are not taken for lost ones.
  void finish();

  struct Impl;

 private:
  // Stops the watchdog and, unless finish() was called, tells the other
  // ranks this one failed.
  void leave() noexcept;

  std::unique_ptr<Impl> impl_;
};

}  // namespace deepcam
