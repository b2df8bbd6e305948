#include "temporary_files.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <regex>
#include <system_error>

#include <fmt/format.h>

namespace deepcam::temporary_files {

namespace fs = std::filesystem;

fs::path hidden_name(const fs::path& target) {
  static std::atomic<unsigned> serial{0};
  const fs::path dir = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  return dir / fmt::format(".{}.tmp{}-{}", target.filename().string(), ::getpid(), serial++);
}

std::optional<long> writer(const std::string& filename) {
  static const std::regex visible(R"(.+\.(?:tmp|partial)-([0-9]{1,9}))");
  static const std::regex hidden(R"(\..+\.tmp([0-9]{1,9})(?:-[0-9]+)?)");
  std::smatch m;
  if (std::regex_match(filename, m, visible) || std::regex_match(filename, m, hidden)) {
    return std::strtol(m[1].str().c_str(), nullptr, 10);
  }
  return std::nullopt;
}

bool alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

std::vector<Stale> stale(const fs::path& dir) {
  std::vector<Stale> found;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::optional<long> pid = writer(it->path().filename().string());
    std::error_code type;
    if (pid && *pid != ::getpid() && !alive(*pid) && it->symlink_status(type).type() == fs::file_type::regular) {
      found.push_back({it->path(), *pid});
    }
  }
  return found;
}

}  // namespace deepcam::temporary_files
