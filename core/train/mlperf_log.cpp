#include "deepcam/mlperf_log.hpp"

#include <chrono>
#include <cstring>

namespace deepcam {

MlperfLog::MlperfLog(std::FILE* out, bool enabled) : out_(out), enabled_(enabled && out) {}

void MlperfLog::event(const std::string& key, const Json& value, Metadata metadata, CallSite site) {
  write("POINT_IN_TIME", key, value, std::move(metadata), site);
}

void MlperfLog::start(const std::string& key, const Json& value, Metadata metadata, CallSite site) {
  write("INTERVAL_START", key, value, std::move(metadata), site);
}

void MlperfLog::end(const std::string& key, const Json& value, Metadata metadata, CallSite site) {
  write("INTERVAL_END", key, value, std::move(metadata), site);
}

void MlperfLog::write(const char* event_type, const std::string& key, const Json& value,
                      Metadata metadata, CallSite site) {
  if (!enabled_) return;
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
  std::fwrite(text.data(), 1, text.size(), out_);
  std::fflush(out_);
  if (echo_) {
    std::fwrite(text.data(), 1, text.size(), echo_);
    std::fflush(echo_);
  }
}

}  // namespace deepcam
