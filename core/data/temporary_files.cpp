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

namespace {

// The writer's pid and the target of a temporary's name (one of the forms in
// the header).
struct Parsed {
  long writer;
  std::string target;
};

std::optional<Parsed> parse(const std::string& filename) {
  static const std::regex visible(R"((.+)\.(?:tmp|partial)-([0-9]{1,9}))");
  static const std::regex hidden(R"(\.(.+)\.tmp([0-9]{1,9})(?:-[0-9]+)?)");
  std::smatch m;
  if (std::regex_match(filename, m, visible) || std::regex_match(filename, m, hidden)) {
    return Parsed{std::strtol(m[2].str().c_str(), nullptr, 10), m[1].str()};
  }
  return std::nullopt;
}

}  // namespace

std::optional<long> writer(const std::string& filename) {
  const std::optional<Parsed> parsed = parse(filename);
  if (!parsed) return std::nullopt;
  return parsed->writer;
}

bool alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

std::vector<Stale> stale(const fs::path& dir) {
  std::vector<Stale> found;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::optional<Parsed> parsed = parse(it->path().filename().string());
    std::error_code type;
    if (parsed && parsed->writer != ::getpid() && !alive(parsed->writer) &&
        it->symlink_status(type).type() == fs::file_type::regular) {
      found.push_back({it->path(), parsed->writer, parsed->target});
    }
  }
  return found;
}

}  // namespace deepcam::temporary_files
