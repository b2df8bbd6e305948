// The training engine (SPEC 7) with MLPerf logging (SPEC 8): builds the
// plugins a RunConfig names, trains until the target IoU or max_epochs, and
// writes the log, the resolved config and checkpoints under run.output_dir.
#pragma once

#include <cstdint>
#include <string>

#include "deepcam/config.hpp"
#include "deepcam/error.hpp"
#include "deepcam/export.hpp"

namespace deepcam {

// The ranks come from the launcher's environment (train/ranks.hpp): one
// process runs one rank.
struct EngineOptions {
  std::string evaluate_checkpoint;  // non-empty: only validate this checkpoint
  // > 0: time this many training steps on a synthetic batch kept on the
  // device and print one JSON line; no MLPerf log, config or checkpoint.
  std::int64_t benchmark_steps = 0;
  // Non-empty: write this checkpoint's predictions of the validation samples
  // into predict_out (one rank): sample-NNNNNN.npy, the predicted class of
  // each pixel (uint8, H x W), and sample-NNNNNN.png, the predicted and true
  // classes over TMQ with a legend. At most predict_samples (0: all).
  std::string predict_checkpoint;
  std::string predict_out;
  std::int64_t predict_samples = 0;
  bool quiet = false;  // the MLPerf log's lines not echoed to stdout
};

// The exit status of a run stopped by a NaN or infinite training loss or
// gradient norm: distinct from 1 (target not reached), 2 (bad input) and
// 3 (internal error), so that scripts can tell divergence apart.
constexpr int kDivergedStatus = 4;

// Thrown on every rank still running when another rank died or stopped
// answering ([run] comm_timeout_s); the message names it. Exit status 5.
class DEEPCAM_API RankLost : public Error {
 public:
  using Error::Error;
  ~RankLost() override;
};

constexpr int kRankLostStatus = 5;

// Prints the resolved configuration (rank 0, to stderr) once the seed is
// set. Returns the process exit status: 0 when the target was reached, 1 when
// max_epochs ended without reaching it, kDivergedStatus when training
// diverged (the MLPerf log then ends with run_stop status "aborted").
// Throws Error on bad input, RankLost when another rank was lost. A program
// that calls it first takes SIGINT and SIGTERM on their own thread
// (take_stop_signals_on_own_thread, deepcam/stop_request.hpp), as
// deepcam-host's main does; run_engine throws Error, before anything else,
// when the calling thread can receive them.
DEEPCAM_API int run_engine(const RunConfig& config, const EngineOptions& options);

}  // namespace deepcam
