#include "deepcam/mlperf_log.hpp"

#include <fmt/format.h>
#include <stdio_ext.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <iterator>
#include <stdexcept>

#include "deepcam/error.hpp"
#include "text.hpp"

namespace deepcam {

std::string write_error_cause(int err) {
  std::string hint;
  if (err == ENOSPC || err == EDQUOT) hint = " (the file system is full or over quota: free space or write elsewhere)";
  if (err == EFBIG) {
    hint = " (the file would exceed the file-size limit, ulimit -f, or the largest file the file system holds)";
  }
  return std::strerror(err) + hint;
}

std::string write_error_text(const std::string& path, int err) {
  return fmt::format("{}: cannot write: {}", path, write_error_cause(err));
}

MlperfLog::MlperfLog(std::FILE* out, bool enabled, std::string name)
    : out_(out), enabled_(enabled && out), name_(std::move(name)) {}

namespace {

// A metadata key given twice, or one of the two the log sets itself, makes a
// JSON object whose value Python's json takes from the last: a caller (a
// plugin's log_hyperparameters) could replace the call site. Checked before
// anything changes, and on every rank, so that each fails alike.
void check_metadata(const std::string& key, const MlperfLog::Metadata& metadata, const CallSite& site) {
  for (std::size_t i = 0; i < metadata.size(); ++i) {
    const std::string& name = metadata[i].first;
    const bool again = std::any_of(metadata.begin(), metadata.begin() + static_cast<std::ptrdiff_t>(i),
                                   [&](const auto& m) { return m.first == name; });
    if (name == "file" || name == "lineno" || again) {
      throw std::logic_error(fmt::format("the MLPerf log line of '{}' (from {}:{}) is given the metadata '{}' {}", key,
                                         site.file, site.line, name,
                                         again ? "twice" : "(the log sets file and lineno itself)"));
    }
  }
}

// "epoch" of "epoch_start" or "epoch_stop"; "" for other keys.
std::string stem_of(const std::string& key, const std::string& suffix) {
  if (key.size() <= suffix.size() || !ends_with(key, suffix)) return "";
  return key.substr(0, key.size() - suffix.size());
}

}  // namespace

void MlperfLog::event(const std::string& key, const Json& value, Metadata metadata, CallSite site) {
  check_metadata(key, metadata, site);
  if (!running_) {
    for (const auto& [logged, first] : settings_) {
      if (logged == key) {
        throw std::logic_error(fmt::format("the MLPerf log line of '{}' (from {}:{}) repeats a setting logged before "
                                           "run_start (from {}:{}); each is logged once",
                                           key, site.file, site.line, first.file, first.line));
      }
    }
    settings_.emplace_back(key, site);
  }
  write("POINT_IN_TIME", key, value, std::move(metadata), site);
}

void MlperfLog::start(const std::string& key, const Json& value, Metadata metadata, CallSite site) {
  check_metadata(key, metadata, site);
  if (key == "run_start") running_ = true;
  if (const std::string stem = stem_of(key, "_start"); !stem.empty()) {
    Metadata kept;
    for (const auto& [name, v] : metadata) {
      if (name == "epoch_num" || name == "step_num") kept.emplace_back(name, v);
      if (stem == "epoch" && name == "epoch_num") last_epoch_num_ = v;
    }
    open_.emplace_back(stem, std::move(kept));
  }
  write("INTERVAL_START", key, value, std::move(metadata), site);
}

void MlperfLog::end(const std::string& key, const Json& value, Metadata metadata, CallSite site) {
  check_metadata(key, metadata, site);
  if (const std::string stem = stem_of(key, "_stop"); !stem.empty()) {
    for (auto it = open_.rbegin(); it != open_.rend(); ++it) {
      if (it->first == stem) {
        open_.erase(std::next(it).base());
        break;
      }
    }
  }
  write("INTERVAL_END", key, value, std::move(metadata), site);
}

Json MlperfLog::close_open_intervals(const Json& step_num, CallSite site) {
  while (!open_.empty() && open_.back().first != "run") {
    auto [stem, metadata] = open_.back();
    if (step_num.kind() != Json::Kind::Null) {
      for (auto& [name, v] : metadata) {
        if (name == "step_num") v = step_num;
      }
    }
    // Cut short, not finished: a save_stop without it read as a save done.
    metadata.emplace_back("status", Json("aborted"));
    end(stem + "_stop", Json(), std::move(metadata), site);
  }
  return last_epoch_num_;
}

void MlperfLog::write(const char* event_type, const std::string& key, const Json& value,
                      Metadata metadata, CallSite site) {
  if (!enabled_ || failed_) return;
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now).count();
  // The file name relative to the source tree, as mllog records it.
  const char* file = site.file;
  if (const char* rel = std::strstr(file, "/core/")) file = rel + 1;
  else if (const char* rel2 = std::strstr(file, "/plugins/")) file = rel2 + 1;
  Metadata md;
  md.emplace_back("file", Json(file));
  md.emplace_back("lineno", Json(site.line));
  for (auto& m : metadata) md.push_back(std::move(m));
  const Json line = Json::object({{"namespace", Json("")},
                                  {"time_ms", Json(static_cast<long long>(ms))},
                                  {"event_type", Json(event_type)},
                                  {"key", Json(key)},
                                  {"value", value},
                                  {"metadata", Json::object(std::move(md))}});
  const std::string text = ":::MLLOG " + line.dump() + "\n";
  // Every line before this one is on disk (flushed), so the file ends here.
  const off_t end = ::ftello(out_);
  const bool written = std::fwrite(text.data(), 1, text.size(), out_) == text.size() && std::fflush(out_) == 0;
  if (!written) {
    const int err = errno;
    failed_ = true;
    // Drop what stdio still holds and cut the part of the line that made it.
    __fpurge(out_);
    if (end >= 0 && ::ftruncate(::fileno(out_), end) == 0) ::fseeko(out_, end, SEEK_SET);
    throw Error(write_error_text(name_.empty() ? "the MLPerf log" : name_, err) +
                "; the log keeps the lines written whole before it (a run stopped before run_start keeps no "
                "log)");
  }
  if (echo_) {
    std::fwrite(text.data(), 1, text.size(), echo_);
    std::fflush(echo_);
  }
}

}  // namespace deepcam
