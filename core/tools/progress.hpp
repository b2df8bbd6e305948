// Progress lines of deepcam-data's long commands (synth, stats, convert,
// verify), on stderr:
//   deepcam-data: convert: 1200/5000 samples (24%), 31.5 samples/s, 2 min 01 s left
// one every few seconds (5) when stderr is a terminal, at most one per 30 s
// when it is not (a log file, a batch job), none with --quiet;
// --progress-seconds S sets the interval either way. Nothing is printed for
// work that ends within the first interval, nor when the work is done (the
// command's summary says so).
#pragma once

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <mutex>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "std_streams.hpp"

namespace deepcam::data {

struct ProgressOptions {
  bool quiet = false;
  double seconds = 0.0;  // > 0: the interval; 0: 5 s on a terminal, 30 s otherwise
};

class Progress {
 public:
  // `what` begins the line ("convert"), `unit` counts the work ("samples").
  Progress(std::string what, std::size_t total, std::string unit, const ProgressOptions& options)
      : what_(std::move(what)),
        unit_(std::move(unit)),
        total_(total),
        quiet_(options.quiet),
        interval_(options.seconds > 0.0 ? options.seconds : ::isatty(STDERR_FILENO) ? 5.0 : 30.0),
        start_(Clock::now()),
        last_(start_) {}

  // Counts `n` more units done; prints a line when the interval has passed.
  // Thread-safe.
  void advance(std::size_t n = 1) {
    if (quiet_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    done_ += n;
    const auto now = Clock::now();
    if (done_ >= total_ || seconds(last_, now) < interval_) return;
    last_ = now;
    const double elapsed = seconds(start_, now);
    const double rate = elapsed > 0.0 ? static_cast<double>(done_) / elapsed : 0.0;
    const std::string left =
        rate > 0.0 ? duration_text(static_cast<double>(total_ - done_) / rate) + " left" : "time left unknown";
    deepcam::eprint("deepcam-data: {}: {}/{} {} ({}%), {} {}/s, {}\n", what_, done_, total_, unit_,
                    done_ * 100 / total_, rate_text(rate), unit_, left);
    std::fflush(stderr);
  }

  // "45 s", "3 min 07 s", "2 h 05 min"
  static std::string duration_text(double s) {
    const auto total = static_cast<long long>(std::llround(s));
    if (total < 60) return fmt::format("{} s", total);
    if (total < 3600) return fmt::format("{} min {:02d} s", total / 60, total % 60);
    return fmt::format("{} h {:02d} min", total / 3600, (total % 3600) / 60);
  }

 private:
  using Clock = std::chrono::steady_clock;
  static double seconds(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }
  static std::string rate_text(double rate) {
    return rate >= 100.0 ? fmt::format("{:.0f}", rate) : rate >= 10.0 ? fmt::format("{:.1f}", rate)
                                                                      : fmt::format("{:.2f}", rate);
  }

  std::string what_, unit_;
  std::size_t total_;
  bool quiet_;
  double interval_;
  Clock::time_point start_, last_;
  std::mutex mutex_;
  std::size_t done_ = 0;
};

}  // namespace deepcam::data
