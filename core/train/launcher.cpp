#include "launcher.hpp"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>  // program_invocation_name (glibc)
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "deepcam/engine.hpp"
#include "deepcam/error.hpp"
#include "deepcam/stop_request.hpp"
#include "ranks.hpp"

namespace deepcam {

namespace {

using Clock = std::chrono::steady_clock;

// Set on the thread that takes the signals (deepcam/stop_request.hpp), read
// by the launcher's loop: an atomic, lock-free for the handler.
std::atomic<int> g_signal{0};

void remember_signal(int sig) { g_signal.store(sig); }

// A port the kernel calls free now (as torchrun picks one).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error(fmt::format("--nproc: cannot open a socket: {}", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw Error(fmt::format("--nproc: cannot find a free port: {}", std::strerror(errno)));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string status_text(int status) {
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return fmt::format("exited with status {}", WEXITSTATUS(status));
}

// "1 rank", "3 ranks".
std::string ranks_text(int n) { return fmt::format("{} rank{}", n, n == 1 ? "" : "s"); }

int exit_code(int status) { return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status); }

// A rank that ended as a stop signal asks: every rank stops at the same
// step with 128 + the signal, whichever rank it was sent to. Or one that
// the signal ended by its default action: --benchmark, whose ranks do not
// agree on a step, and a rank before its handler is set.
bool stopped_by_signal(int status) {
  const int code = exit_code(status);
  return code == 128 + SIGTERM || code == 128 + SIGINT;
}

// One child's output stream, forwarded line by line with the rank prefix.
struct Stream {
  int fd = -1;
  std::FILE* to = nullptr;
  std::string pending;
  int rank = 0;

  void forward(const char* data, std::size_t n) {
    pending.append(data, n);
    std::size_t start = 0;
    for (std::size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
      std::fprintf(to, "[rank %d] %.*s\n", rank, static_cast<int>(nl - start), pending.data() + start);
    }
    pending.erase(0, start);
    std::fflush(to);
  }
  void flush_rest() {
    if (!pending.empty()) std::fprintf(to, "[rank %d] %s\n", rank, pending.c_str());
    pending.clear();
    std::fflush(to);
  }
};

// Every rank that failed lost another (status 5), and a rank had stopped on
// a stop signal sent to it (`stop_status`): the rank they lost is that one,
// which left before the ranks could stop together (--benchmark, whose ranks
// agree on no step; a stop while it staged its files). The run stopped; no
// rank failed.
bool stop_explains(const std::vector<bool>& failed, const std::vector<int>& codes, int stop_status) {
  if (stop_status == 0) return false;
  for (std::size_t r = 0; r < failed.size(); ++r) {
    if (failed[r] && codes[r] != kRankLostStatus) return false;
  }
  return true;
}

}  // namespace

int rank_to_blame(const std::vector<bool>& failed, const std::vector<int>& codes, int first_reaped) {
  for (std::size_t r = 0; r < failed.size() && r < codes.size(); ++r)
    if (failed[r] && codes[r] != kRankLostStatus) return static_cast<int>(r);
  return first_reaped;
}

int launch_local_ranks(int nproc, const std::vector<std::string>& args) {
  if (nproc < 1) throw Error(fmt::format("--nproc {}: needs at least 1", nproc));
  // Started as one rank of many by torchrun or by --nproc itself, or as one
  // task of many of an srun step or an MPI launcher, the ranks it would
  // start would meet those of the other copies under the same address, or
  // train as worlds of their own into one output_dir. (A batch script's own
  // Slurm variables, without SLURM_STEP_NUM_TASKS, are no launcher's: such a
  // script starts --nproc legitimately; they are cleared below.)
  for (const auto& [name, launcher] : {std::pair{"WORLD_SIZE", "torchrun or deepcam-host --nproc"},
                                       std::pair{"SLURM_STEP_NUM_TASKS", "a task of an srun step"},
                                       std::pair{"OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"},
                                       std::pair{"PMI_SIZE", "an MPI launcher (PMI)"}}) {
    const char* size = std::getenv(name);
    if (!size || !*size || std::strcmp(size, "1") == 0) continue;
    throw Error(fmt::format("--nproc {}: this process is already one of the ranks of a launcher ({}={}: {}); start "
                            "the ranks with that launcher (one task per rank) or with --nproc (one task), not both",
                            nproc, name, size, launcher));
  }
  const char* addr = std::getenv("MASTER_ADDR");
  const char* port = std::getenv("MASTER_PORT");
  const std::string master_addr = addr && *addr ? addr : "127.0.0.1";
  const std::string master_port = port && *port ? port : std::to_string(free_port());

  std::vector<char*> argv;
  std::vector<std::string> storage;
  // The ranks run this program's file (found below) under the name it was
  // started by, so that they show in ps and name themselves in messages
  // (program_invocation_short_name) as the launcher does.
  storage.push_back(program_invocation_name);
  for (const auto& a : args) storage.push_back(a);
  for (auto& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) throw Error(fmt::format("--nproc: cannot find this program: {}", std::strerror(errno)));
  self[n] = '\0';

  // A signal ignored on entry stays ignored, here and (inherited) in the ranks.
  catch_stop_signals(remember_signal);

  std::vector<pid_t> pids(static_cast<std::size_t>(nproc), -1);
  std::vector<Stream> streams;
  const pid_t parent = ::getpid();
  const std::vector<std::string> outer = outer_launcher_variables();  // before fork: allocates
  for (int r = 0; r < nproc; ++r) {
    int out[2], err[2];
    if (::pipe(out) != 0 || ::pipe(err) != 0) throw Error(fmt::format("--nproc: pipe: {}", std::strerror(errno)));
    const pid_t pid = ::fork();
    if (pid < 0) throw Error(fmt::format("--nproc: fork: {}", std::strerror(errno)));
    if (pid == 0) {
      // A child must not outlive a launcher that was killed.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      // The rank starts with the mask this process started with, and sets
      // up its own signal thread.
      restore_start_signal_mask();
      if (::getppid() != parent) std::_Exit(1);
      ::dup2(out[1], STDOUT_FILENO);
      ::dup2(err[1], STDERR_FILENO);
      ::close(out[0]);
      ::close(out[1]);
      ::close(err[0]);
      ::close(err[1]);
      // Inside an outer launch (an sbatch script of the same task count):
      // these ranks are this launcher's, not the outer one's.
      for (const std::string& name : outer) ::unsetenv(name.c_str());
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", master_addr.c_str(), 1);
      ::setenv("MASTER_PORT", master_port.c_str(), 1);
      ::execv(self, argv.data());
      std::fprintf(stderr, "deepcam-host --nproc: cannot run %s: %s\n", self, std::strerror(errno));
      std::_Exit(127);
    }
    ::close(out[1]);
    ::close(err[1]);
    pids[static_cast<std::size_t>(r)] = pid;
    streams.push_back(Stream{out[0], stdout, "", r});
    streams.push_back(Stream{err[0], stderr, "", r});
  }

  int result = 0;
  int failed_rank = -1;              // the first rank reaped that failed on its own
  std::vector<bool> failed(static_cast<std::size_t>(nproc), false);  // every such rank
  int stop_status = 0;  // a stop signal sent to a rank, not to the launcher
  std::vector<int> codes(static_cast<std::size_t>(nproc), 0);
  int running = nproc;
  Clock::time_point grace_end{};
  bool terminated = false, killed = false;
  const auto grace = std::chrono::seconds(10);
  char buffer[65536];
  while (running > 0 || std::any_of(streams.begin(), streams.end(), [](const Stream& s) { return s.fd >= 0; })) {
    std::vector<pollfd> fds;
    std::vector<Stream*> owners;
    for (Stream& s : streams) {
      if (s.fd < 0) continue;
      fds.push_back(pollfd{s.fd, POLLIN, 0});
      owners.push_back(&s);
    }
    if (!fds.empty()) ::poll(fds.data(), fds.size(), 200);
    else ::usleep(100 * 1000);
    for (std::size_t i = 0; i < fds.size(); ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t got = ::read(fds[i].fd, buffer, sizeof(buffer));
      if (got > 0) {
        owners[i]->forward(buffer, static_cast<std::size_t>(got));
      } else if (got == 0 || errno != EINTR) {
        owners[i]->flush_rest();
        ::close(owners[i]->fd);
        owners[i]->fd = -1;
      }
    }
    for (int r = 0; r < nproc; ++r) {
      pid_t& pid = pids[static_cast<std::size_t>(r)];
      if (pid < 0) continue;
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) != pid) continue;
      pid = -1;
      --running;
      codes[static_cast<std::size_t>(r)] = exit_code(status);
      // 1 is a normal end too: the target was not reached (every rank says so).
      if (exit_code(status) != 0 && exit_code(status) != 1) {
        std::fprintf(stderr, "deepcam-host --nproc: rank %d %s\n", r, status_text(status).c_str());
        // After a signal to the launcher the ranks end as it asked: no rank
        // is to blame, and the status is the launcher's own, 128 + the signal.
        // Nor is a rank to blame that stopped on a signal sent to one of the
        // ranks (rank 0's message names which): the others stop with it.
        if (g_signal.load() == 0 && stopped_by_signal(status)) {
          if (stop_status == 0) {
            stop_status = exit_code(status);
            if (grace_end == Clock::time_point{}) grace_end = Clock::now() + grace;
          }
        } else if (g_signal.load() == 0 && !terminated) {
          failed[static_cast<std::size_t>(r)] = true;
          if (failed_rank < 0) {
            failed_rank = r;
            result = exit_code(status);
            grace_end = Clock::now() + grace;
          }
        }
      }
    }
    const int received = g_signal.load();
    if (received && !terminated) {
      std::fprintf(stderr, "deepcam-host --nproc: %s; ending every rank\n", strsignal(received));
      if (result == 0) result = 128 + received;
      grace_end = Clock::now();
    }
    const bool past_grace = grace_end != Clock::time_point{} && Clock::now() >= grace_end;
    if (running > 0 && past_grace && !terminated) {
      if (failed_rank >= 0 && !stop_explains(failed, codes, stop_status)) {
        std::fprintf(stderr, "deepcam-host --nproc: rank %d failed; ending the %s still running\n", failed_rank,
                     ranks_text(running).c_str());
      } else if (!received) {
        std::fprintf(stderr, "deepcam-host --nproc: a rank stopped on a signal; ending the %s still running\n",
                     ranks_text(running).c_str());
      }
      // The launcher's own signal passed on, as torchrun does; SIGTERM after a rank failed.
      for (pid_t pid : pids) if (pid > 0) ::kill(pid, received ? received : SIGTERM);
      terminated = true;
      // Time to reach the next logging point and close the log (Slurm waits 30 s).
      grace_end = Clock::now() + std::chrono::seconds(30);
    } else if (running > 0 && terminated && !killed && Clock::now() >= grace_end) {
      for (pid_t pid : pids) if (pid > 0) ::kill(pid, SIGKILL);
      killed = true;
    }
  }
  const bool stopped = failed_rank >= 0 && stop_explains(failed, codes, stop_status);
  if (failed_rank >= 0 && !stopped) {
    failed_rank = rank_to_blame(failed, codes, failed_rank);
    result = codes[static_cast<std::size_t>(failed_rank)];
    std::fprintf(stderr, "deepcam-host --nproc: failed: rank %d (exit status %d%s)\n", failed_rank, result,
                 result == kRankLostStatus ? ": it lost another rank, which its message names" : "");
    return result;
  }
  if ((result == 0 || stopped) && stop_status != 0) {
    std::fprintf(stderr, "deepcam-host --nproc: the ranks stopped on %s sent to a rank, not to the launcher "
                 "(exit status %d)\n", strsignal(stop_status - 128), stop_status);
    return stop_status;
  }
  return result != 0 ? result : codes[0];
}

}  // namespace deepcam
