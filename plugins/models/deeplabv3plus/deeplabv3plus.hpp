// Description
//   DeepLabv3+ with a modified aligned-Xception encoder, the DeepCAM
//   segmentation network (SPEC section 3). Its state-dict names, order and
//   shapes are those of the MLCommons reference, so that checkpoints pass
//   both ways between deepcam-host and the reference. The input's height and
//   width are free as long as they are multiples of the output stride; the
//   image-pooling branch follows the actual feature-map size.
//
// Usage
//   [model]
//   name = "deeplabv3plus"
//   width = 1.0          # 0.0625 gives a tiny model for tests
//   middle_blocks = 16
//   output_stride = 16
//
// Parameters
//   Property      | Description                                          | Required | Default
//   --------------|------------------------------------------------------|----------|--------
//   width         | factor on every internal channel count, in (0, 1];   | no       | 1.0
//                 | each count is rounded, at least 1; names unchanged   |          |
//   middle_blocks | middle-flow blocks (1..16): block4..block(3+n), the  | no       | 16
//                 | exit block is block(4+n)                             |          |
//   output_stride | encoder output stride, 16 or 8 (8: dilated variant)  | no       | 16
//
//   Input channels, the number of classes and the BatchNorm group come from
//   the host (ModelContext), not from this table. With a BatchNorm group every
//   BatchNorm layer is synchronous over it in training (SyncBatchNorm).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "deepcam/model.hpp"
#include "deepcam/params.hpp"

namespace deepcam::models {

struct DeepLabV3PlusOptions {
  std::int64_t in_channels = 16;
  std::int64_t n_classes = 3;
  double width = 1.0;
  std::int64_t middle_blocks = 16;
  std::int64_t output_stride = 16;
  // Shared BatchNorm statistics in training ([run] batchnorm_group_size);
  // nullptr: each rank its own.
  Group* batchnorm_group = nullptr;

  // Checks the plugin's table (ranges the schema cannot express, such as
  // width > 0 and output_stride in {8, 16}); errors name params.where().
  static DeepLabV3PlusOptions from(const Params& params, const ModelContext& context);
};

class DeepLabV3Plus final : public Model {
 public:
  explicit DeepLabV3Plus(const DeepLabV3PlusOptions& options);
  ~DeepLabV3Plus() override;

  torch::nn::Module& module() override;
  // Refuses, with a deepcam::Error naming the shape, an input that is not
  // (B, in_channels, H, W) with H and W multiples of the output stride.
  at::Tensor forward(const at::Tensor& input) override;

  const DeepLabV3PlusOptions& options() const { return options_; }

 private:
  struct Net;  // the torch module tree, defined with its layers in the .cpp
  DeepLabV3PlusOptions options_;
  std::shared_ptr<Net> net_;
};

}  // namespace deepcam::models
