#include "staging.hpp"

#include <errno.h>  // program_invocation_short_name: these lines speak for the running tool
#include <fcntl.h>
#include <signal.h>
#include <ftw.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <atomic>
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "deepcam/error.hpp"
#include "deepcam/stop_request.hpp"

namespace deepcam::readers {

namespace fs = std::filesystem;

namespace {

constexpr std::size_t kChunk = std::size_t{4} << 20;  // 4 MiB: large sequential reads on a parallel file system

// A file descriptor closed on every path out.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  // Closes now and reports failure: a delayed write error on NFS shows here.
  int close() {
    const int r = ::close(fd);
    fd = -1;
    return r;
  }
};

std::string errno_text(int e) { return std::strerror(e); }

// "SIGTERM", as users send it.
std::string signal_name(int signal) {
  const char* abbreviation = ::sigabbrev_np(signal);
  return abbreviation ? fmt::format("SIG{}", abbreviation) : fmt::format("signal {}", signal);
}

// A stop request (SIGTERM, SIGINT) ends staging between chunks: a shard on
// a slow file system takes minutes, more than a batch system waits between
// its signal and its kill. The partial copy goes as after a failed write.
void throw_if_stop_requested(const std::string& source) {
  if (const int signal = stop_requested()) {
    throw StopRequested(signal, fmt::format("{}: staging stopped by {}", source, signal_name(signal)));
  }
}

// Reads up to `size` bytes, retrying interrupted and short reads; returns
// the count (less than size only at the end of the file).
std::size_t read_full(int fd, char* buf, std::size_t size, const std::string& path) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::read(fd, buf + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(fmt::format("{}: read failed while staging: {}", path, errno_text(errno)));
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

// Whether the process that made the staging directory named `name`
// (deepcam-stage-<pid>-XXXXXX) is gone; false for another name.
bool maker_gone(const std::string& name) {
  const std::string prefix = "deepcam-stage-";
  if (name.rfind(prefix, 0) != 0) return false;
  const std::size_t dash = name.find('-', prefix.size());
  if (dash == std::string::npos) return false;
  const std::string digits = name.substr(prefix.size(), dash - prefix.size());
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) return false;
  const long pid = std::strtol(digits.c_str(), nullptr, 10);
  // ESRCH: no such process. EPERM means it exists (another user's).
  return pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

}  // namespace

std::vector<std::string> leftover_areas(const std::string& parent) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    if (maker_gone(it->path().filename().string())) out.push_back(it->path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A run killed by a signal (a job's time limit) cannot remove its copies, and
// in /dev/shm they hold memory until removed. They are only reported, not
// removed: a process with the same number in another container sharing the
// directory would lose its data.
static void warn_about_leftovers(const std::string& parent) {
  for (const auto& dir : leftover_areas(parent)) {
    std::fprintf(stderr,
                 "%s: warning: %s was left by a run that is no longer running (killed?); remove it "
                 "if no other job on this node uses it\n",
                 program_invocation_short_name, dir.c_str());
  }
}

std::uint64_t checksum(const void* data, std::size_t size, std::uint64_t state) {
  constexpr std::uint64_t kPrime = 0x100000001b3ULL;
  const auto* p = static_cast<const unsigned char*>(data);
  std::size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, p + i, 8);
    state = (state ^ word) * kPrime;
  }
  for (; i < size; ++i) state = (state ^ p[i]) * kPrime;
  return state;
}

// A fresh directory <parent>/deepcam-stage-<pid>-<random>.
static std::string make_fresh_dir(const std::string& parent, const std::string& where, bool report_leftovers) {
  std::error_code ec;
  if (!fs::is_directory(parent, ec)) {
    const bool exists = fs::exists(parent, ec);
    throw Error(fmt::format("{}: {}; give an existing node-local directory such as /dev/shm or /tmp", where,
                            exists ? "not a directory" : "no such directory"));
  }
  if (report_leftovers) warn_about_leftovers(parent);
  // The pid in the name lets a later run tell a leftover from a live copy.
  std::string templ = (fs::path(parent) / fmt::format("deepcam-stage-{}-XXXXXX", ::getpid())).string();
  if (!::mkdtemp(templ.data())) {
    throw Error(fmt::format("{}: cannot create a staging directory there: {}", where, errno_text(errno)));
  }
  return templ;
}

// Not std::filesystem::remove_all: libtorch.so exports its own broken copy
// of it, which may be bound ahead of libstdc++'s. Nothing can be thrown
// from here (destructors); a leftover directory is reported so that it can
// be removed by hand.
static void remove_tree(const std::string& dir) {
  const int failed = ::nftw(
      dir.c_str(), [](const char* file, const struct stat*, int, struct FTW*) { return ::remove(file); }, 16,
      FTW_DEPTH | FTW_PHYS);
  if (failed != 0) {
    std::fprintf(stderr, "%s: could not remove the staged copies in %s: %s\n", program_invocation_short_name,
                 dir.c_str(), std::strerror(errno));
  }
}

// An open descriptor of the directory at `dir` (-1 if none): while it is
// open, the directory's inode cannot be reused, so that the identity it
// gives (fstat) is the directory's for good.
static int hold_dir(const std::string& dir) { return ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }

// remove_tree(dir) if `dir` is still the directory that `held` (hold_dir)
// holds: a staging directory that was removed while the run went on, and
// something of the user's put at its path (a file, another folder), is not
// ours to remove. Closes `held`; -1 (it could not be opened) removes `dir`
// unchecked.
static void remove_own_tree(const std::string& dir, int held) {
  // Not held (no descriptor was left to open it): removed as before.
  if (held < 0) {
    remove_tree(dir);
    return;
  }
  struct stat now {}, made {};
  const bool ours = ::lstat(dir.c_str(), &now) == 0 && ::fstat(held, &made) == 0 && S_ISDIR(now.st_mode) &&
                    now.st_dev == made.st_dev && now.st_ino == made.st_ino;
  const bool something = ::lstat(dir.c_str(), &now) == 0;
  ::close(held);
  if (ours) {
    remove_tree(dir);
  } else if (something) {
    std::fprintf(stderr,
                 "%s: %s is no longer the staging directory this run made (it was removed while the run went on, "
                 "and another %s is there now): left as it is\n",
                 program_invocation_short_name, dir.c_str(), S_ISDIR(now.st_mode) ? "folder" : "file");
  }
}

static int flock_retrying(int fd, int operation) {
  int r;
  while ((r = ::flock(fd, operation)) != 0 && errno == EINTR) {
  }
  return r;
}

static std::string lock_path(const std::string& dir) { return (fs::path(dir) / ".users").string(); }
static std::string orphan_path(const std::string& dir) { return (fs::path(dir) / ".orphaned").string(); }

static Error lock_failed(const std::string& lock, int e, const std::string& where) {
  return Error(fmt::format("{}: cannot lock the node's shared staging directory: {}; {} must be on a local file "
                           "system that supports flock(2), such as /dev/shm or /tmp",
                           lock, errno_text(e), where));
}

StagingArea::StagingArea(const std::string& parent, const std::string& where, bool report_leftovers)
    : role_(Role::Private),
      dir_(make_fresh_dir(parent, where, report_leftovers)),
      where_(where),
      dir_fd_(hold_dir(dir_)) {}

StagingArea::StagingArea(Role role, std::string dir, std::string where, int lock_fd,
                         std::chrono::milliseconds grace)
    : role_(role),
      dir_(std::move(dir)),
      where_(std::move(where)),
      lock_fd_(lock_fd),
      grace_(grace),
      dir_fd_(hold_dir(dir_)) {}

std::unique_ptr<StagingArea> StagingArea::create_shared(const std::string& parent, const std::string& where,
                                                        std::chrono::milliseconds grace) {
  const std::string dir = make_fresh_dir(parent, where, /*report_leftovers=*/true);
  const std::string lock = lock_path(dir);
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 || flock_retrying(fd, LOCK_SH) != 0) {
    const int e = errno;
    if (fd >= 0) ::close(fd);
    remove_tree(dir);
    throw lock_failed(lock, e, where);
  }
  try {
    return std::unique_ptr<StagingArea>(new StagingArea(Role::SharedOwner, dir, where, fd, grace));
  } catch (...) {
    ::close(fd);
    remove_tree(dir);
    throw;
  }
}

std::unique_ptr<StagingArea> StagingArea::join_shared(const std::string& dir, const std::string& where) {
  const std::string lock = lock_path(dir);
  const int fd = ::open(lock.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    throw Error(fmt::format("{}: cannot join the node's shared staging directory: {} (has node-rank 0 stopped?)",
                            lock, errno_text(errno)));
  }
  if (flock_retrying(fd, LOCK_SH) != 0) {
    const int e = errno;
    ::close(fd);
    throw lock_failed(lock, e, where);
  }
  // Removed between the open and the lock: whoever removed it held the
  // exclusive lock, so holding the shared one now, it stays as it is.
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_nlink == 0) {
    ::close(fd);
    throw Error(fmt::format("{}: the node's shared staging directory was removed before this rank could join it "
                            "(has node-rank 0 stopped?)",
                            dir));
  }
  try {
    return std::unique_ptr<StagingArea>(new StagingArea(Role::SharedMember, dir, where, fd, {}));
  } catch (...) {
    ::close(fd);
    throw;
  }
}

void StagingArea::remove_locked() {
  struct stat st {};
  if (::fstat(lock_fd_, &st) == 0 && st.st_nlink == 0) return;  // another user removed it
  remove_own_tree(dir_, std::exchange(dir_fd_, -1));
}

StagingArea::~StagingArea() {
  switch (role_) {
    case Role::Private:
      remove_own_tree(dir_, std::exchange(dir_fd_, -1));
      return;
    case Role::SharedOwner: {
      // The rule is in staging.hpp. Let go, then wait for the exclusive
      // lock: granted once no other rank of the node holds the area.
      ::flock(lock_fd_, LOCK_UN);
      const auto deadline = std::chrono::steady_clock::now() + grace_;
      bool held = false;
      for (;;) {
        held = ::flock(lock_fd_, LOCK_EX | LOCK_NB) == 0;
        if (held || std::chrono::steady_clock::now() >= deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      bool marked = false;
      int mark_error = 0;
      if (!held) {
        // Left to the last user. The marker comes first and the lock is
        // tried once more after it: a rank that let go before the marker
        // existed let go before this try too.
        const int m = ::open(orphan_path(dir_).c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        marked = m >= 0;
        if (m >= 0) ::close(m);
        else mark_error = errno;
        held = ::flock(lock_fd_, LOCK_EX | LOCK_NB) == 0;
      }
      if (held) {
        remove_locked();
      } else if (marked) {
        std::fprintf(stderr,
                     "%s: other ranks of this node still use the staged copies in %s after %.1f s; the "
                     "last of them removes them\n",
                     program_invocation_short_name, dir_.c_str(), static_cast<double>(grace_.count()) / 1000.0);
      } else {
        std::fprintf(stderr,
                     "%s: other ranks of this node still use the staged copies in %s, and they cannot be "
                     "told to remove them (%s); remove it by hand once they have stopped\n",
                     program_invocation_short_name, dir_.c_str(), std::strerror(mark_error));
      }
      if (dir_fd_ >= 0) ::close(dir_fd_);
      ::close(lock_fd_);
      return;
    }
    case Role::SharedMember:
      ::flock(lock_fd_, LOCK_UN);
      if ((::access(orphan_path(dir_).c_str(), F_OK) == 0 || maker_gone(fs::path(dir_).filename().string())) &&
          ::flock(lock_fd_, LOCK_EX | LOCK_NB) == 0) {
        remove_locked();
      }
      if (dir_fd_ >= 0) ::close(dir_fd_);
      ::close(lock_fd_);
      return;
  }
}

std::uint64_t StagingArea::bytes() const { return bytes_.load(); }

std::string StagingArea::target(const std::string& source, const std::string& subdir) const {
  return (fs::path(dir_) / subdir / fs::path(source).filename()).string();
}

std::string StagingArea::copy(const std::string& source, const std::string& subdir) const {
  const fs::path target_dir = fs::path(dir_) / subdir;
  std::error_code ec;
  fs::create_directories(target_dir, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the staging directory: {}", target_dir.string(), ec.message()));
  const std::string target = this->target(source, subdir);
  // Written under a temporary name: a copy that exists under its own name is
  // complete and checked.
  const std::string partial = target + ".partial";

  Fd in(::open(source.c_str(), O_RDONLY | O_CLOEXEC));
  if (in.fd < 0) throw Error(fmt::format("{}: cannot open for staging: {}", source, errno_text(errno)));
  struct stat st {};
  if (::fstat(in.fd, &st) != 0) throw Error(fmt::format("{}: cannot stat: {}", source, errno_text(errno)));
  const auto size = static_cast<std::uint64_t>(st.st_size);

  struct RemoveUnlessKept {
    const std::string& path;
    bool keep = false;
    ~RemoveUnlessKept() {
      if (!keep) ::unlink(path.c_str());
    }
  } cleanup{partial};
  Fd out(::open(partial.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (out.fd < 0) throw Error(fmt::format("{}: cannot create the staged copy: {}", partial, errno_text(errno)));

  auto write_failed = [&](int e) {
    const char* hint = (e == ENOSPC || e == EFBIG || e == EDQUOT)
                           ? "; free space there or point stage_dir at a larger directory"
                           : "";
    return Error(fmt::format("{}: cannot write the staged copy of {} ({}){}; {}", target, source, errno_text(e), hint,
                             where_));
  };

  std::unique_ptr<char[]> buf(new char[kChunk]);
  std::uint64_t sum = kChecksumSeed, copied = 0;
  for (;;) {
    throw_if_stop_requested(source);
    const std::size_t n = read_full(in.fd, buf.get(), kChunk, source);
    if (n == 0) break;
    sum = checksum(buf.get(), n, sum);
    for (std::size_t done = 0; done < n;) {
      const ssize_t w = ::write(out.fd, buf.get() + done, n - done);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) throw write_failed(errno);
      done += static_cast<std::size_t>(w);
    }
    copied += n;
    bytes_ += n;
  }
  if (out.close() != 0) throw write_failed(errno);
  if (copied != size) {
    throw Error(fmt::format("{}: changed while staging (read {} bytes, its size is {})", source, copied, size));
  }

  // Check what landed on the staging device, not what we meant to write.
  Fd back(::open(partial.c_str(), O_RDONLY | O_CLOEXEC));
  if (back.fd < 0) throw Error(fmt::format("{}: cannot reopen the staged copy: {}", partial, errno_text(errno)));
  struct stat bst {};
  if (::fstat(back.fd, &bst) != 0 || static_cast<std::uint64_t>(bst.st_size) != size) {
    throw Error(fmt::format("{}: the staged copy of {} has {} bytes, the source {}", target, source,
                            static_cast<long long>(bst.st_size), size));
  }
  std::uint64_t back_sum = kChecksumSeed;
  for (std::size_t n; (n = read_full(back.fd, buf.get(), kChunk, partial)) > 0;) {
    throw_if_stop_requested(source);
    back_sum = checksum(buf.get(), n, back_sum);
  }
  if (back_sum != sum) {
    throw Error(fmt::format("{}: the staged copy of {} differs from it (checksum {:016x}, source {:016x}); the "
                            "staging device may be failing",
                            target, source, back_sum, sum));
  }
  if (::rename(partial.c_str(), target.c_str()) != 0) {
    throw Error(fmt::format("{}: cannot rename the staged copy into place: {}", target, errno_text(errno)));
  }
  cleanup.keep = true;
  return target;
}

std::vector<std::vector<std::string>> StagingArea::copy_all(const std::vector<std::vector<std::string>>& groups,
                                                            const std::string& subdir, int threads) const {
  std::vector<std::vector<std::string>> out(groups.size());
  std::atomic<std::size_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::atomic<int> stopped{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (std::size_t i; !failed && (i = next++) < groups.size();) {
      try {
        std::vector<std::string> copies;
        for (const auto& f : groups[i]) copies.push_back(copy(f, subdir));
        out[i] = std::move(copies);
        ++done;
      } catch (const StopRequested& s) {
        stopped = s.signal();
        failed = true;
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  const int n = std::max(1, std::min<int>(threads, static_cast<int>(groups.size())));
  for (int t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
  if (stopped) {
    throw StopRequested(stopped, fmt::format("staging the {} files into {} stopped by {} after {} of {} samples",
                                             subdir, dir_, signal_name(stopped), done.load(), groups.size()));
  }
  return out;
}

}  // namespace deepcam::readers
