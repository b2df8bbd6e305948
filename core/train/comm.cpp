#include "comm.hpp"

#include <ATen/ATen.h>
#include <c10/util/Logging.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <ifaddrs.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>

#include "deepcam/stop_request.hpp"
#include "deepcam_build_config.h"
#if DEEPCAM_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace deepcam {

namespace {

using Clock = std::chrono::steady_clock;
using BackendType = c10d::ProcessGroup::BackendType;

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

double seconds(std::chrono::milliseconds ms) { return static_cast<double>(ms.count()) / 1000.0; }

std::string heartbeat_key(int rank) { return fmt::format("deepcam/alive/{}", rank); }
const char* const kLostKey = "deepcam/lost";
// How many ranks have read kLostKey's verdict.
const char* const kLostReadKey = "deepcam/lost-read";
// Why a rank refused to join this world (started for another world size,
// as a rank another process joined as, ...): the others stop at once too.
const char* const kRefusedKey = "deepcam/refused";
// A joining rank's token (Impl::join_store).
std::string joined_key(int rank) { return fmt::format("deepcam/joined/{}", rank); }
// Rank 0's token and every rank's, in rank order, once all have joined.
const char* const kRosterKey = "deepcam/roster";
// A rank's answer to the roster: rank 0's token.
std::string answer_key(int rank) { return fmt::format("deepcam/answer/{}", rank); }
// Counts the processes that joined as `rank` (more than one is refused).
std::string rank_key(int rank) { return fmt::format("deepcam/rank/{}", rank); }
// "SIGNAL why": a rank stopped by a signal before the ranks had met.
const char* const kStoppedKey = "deepcam/stopped";
// How many ranks gave up the rendezvous: one that comes later is told.
const char* const kLeftKey = "deepcam/left";
// How many ranks have joined the store, each once.
const char* const kArrivedKey = "deepcam/arrived";
// Rank 0's token, once every rank has answered the roster.
const char* const kMetKey = "deepcam/met";
const std::string kDone = "done";      // ended normally
const std::string kFailed = "failed";  // ended by an error of its own

// Tries a TCP connection to host:port until one is taken or `deadline`
// passes: "" once taken (and closed at once), else the last attempt's
// error. Each attempt waits at most a second. A stop signal ends the
// tries: `stopped` throws.
std::string reach(const std::string& host, std::uint16_t port, Clock::time_point deadline,
                  const std::function<void(int)>& stopped) {
  std::string last;
  for (;;) {
    if (const int signal = stop_requested()) stopped(signal);
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    if (const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found); rc != 0) {
      last = ::gai_strerror(rc);
    } else {
      for (const addrinfo* a = found; a; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
          last = std::strerror(errno);
          continue;
        }
        int error = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0 ? 0 : errno;
        if (error == EINPROGRESS) {
          pollfd p{fd, POLLOUT, 0};
          const int ready = ::poll(&p, 1, 1000);
          socklen_t length = sizeof error;
          if (ready == 1) ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
          else error = ready == 0 ? ETIMEDOUT : errno;
        }
        ::close(fd);
        if (error == 0) {
          ::freeaddrinfo(found);
          return "";
        }
        last = std::strerror(error);
      }
      ::freeaddrinfo(found);
    }
    if (Clock::now() >= deadline) return last;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

std::string text_of(const std::vector<std::uint8_t>& bytes) { return std::string(bytes.begin(), bytes.end()); }
std::vector<std::uint8_t> bytes_of(const std::string& text) { return {text.begin(), text.end()}; }

// How long a rank that refuses the rendezvous waits for the ranks still to
// come to read why (Impl::leave_rendezvous).
constexpr std::chrono::seconds kRefusalLinger{30};

// The wall clock's seconds, as every host of a run has them (give or take
// its clock's drift).
long long wall_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A refusal's or a stop's text for the store, stamped with the wall-clock
// second it was written.
std::vector<std::uint8_t> stamped(const std::string& text) {
  return bytes_of(fmt::format("{} {}", wall_seconds(), text));
}

// A stamped value's text, and whether it was written in this run's time:
// not older than a refusing rank waits (with as long again for the hosts'
// clocks), which would make it an earlier run's, left in a file store by a
// rank that was killed.
std::pair<std::string, bool> unstamped(const std::vector<std::uint8_t>& value) {
  const std::string text = text_of(value);
  const auto space = text.find(' ');
  if (space == std::string::npos) return {text, false};
  const bool recent = std::llabs(wall_seconds() - std::atoll(text.c_str())) <= 2 * kRefusalLinger.count();
  return {text.substr(space + 1), recent};
}

std::string hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
  return name;
}

// The network interfaces here that have an address, as GLOO_SOCKET_IFNAME
// may name them.
std::vector<std::string> interfaces() {
  std::set<std::string> names;
  ifaddrs* all = nullptr;
  if (::getifaddrs(&all) != 0) return {};
  for (const ifaddrs* i = all; i; i = i->ifa_next) {
    if (i->ifa_addr && (i->ifa_addr->sa_family == AF_INET || i->ifa_addr->sa_family == AF_INET6)) {
      names.insert(i->ifa_name);
    }
  }
  ::freeifaddrs(all);
  return {names.begin(), names.end()};
}

// Work on a thread of its own, which the starting thread waits for in
// slices and may leave behind (c10d's calls may never return): what the
// two share lives as long as either needs it.
class Background {
 public:
  explicit Background(std::function<void()> work) : shared_(std::make_shared<Shared>()) {
    thread_ = std::thread([work = std::move(work), shared = shared_] {
      std::exception_ptr error;
      try {
        work();
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->done = true;
      shared->error = error;
      shared->done_cv.notify_all();
    });
  }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;
  // Every way out of a waiting loop joins the thread or leaves it behind;
  // were an exception to leave one otherwise, the thread is left behind
  // rather than end the program (std::thread's destructor would).
  ~Background() {
    if (thread_.joinable()) thread_.detach();
  }
  // Whether the work ended within `slice`.
  bool ended_within(std::chrono::milliseconds slice) {
    std::unique_lock<std::mutex> lock(shared_->mutex);
    return shared_->done_cv.wait_for(lock, slice, [&] { return shared_->done; });
  }
  // Once it ended: its exception, if it threw one.
  void join() {
    thread_.join();
    if (shared_->error) std::rethrow_exception(shared_->error);
  }
  // Left in its call, for ever maybe.
  void leave_behind() { thread_.detach(); }

 private:
  struct Shared {
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    std::exception_ptr error;
  };
  std::shared_ptr<Shared> shared_;
  std::thread thread_;
};

// Since when a thread that looks every `step` has looked without a pause
// of its own process (a SIGSTOP, Slurm's suspend and resume) between two
// looks: the time such a pause took counts for no one's silence.
class AwakeSince {
 public:
  explicit AwakeSince(std::chrono::milliseconds step) : step_(step) {}
  // At each look.
  Clock::time_point look() {
    const auto now = Clock::now();
    if (now - looked_ > step_ + std::chrono::seconds(1)) since_ = now;
    looked_ = now;
    return since_;
  }

 private:
  std::chrono::milliseconds step_;
  Clock::time_point since_ = Clock::now();
  Clock::time_point looked_ = since_;
};

}  // namespace

class ProcessGroupGroup;

struct Communicator::Impl {
  RankLayout layout;
  CommOptions options;
  c10::intrusive_ptr<c10d::Store> store;
  std::vector<std::string> hosts;
  int nodes = 1;
  int max_local_size = 1;
  std::unique_ptr<ProcessGroupGroup> world, node;
  std::map<int, std::unique_ptr<ProcessGroupGroup>> consecutive;

  // The watchdog.
  std::chrono::milliseconds interval{1000};
  std::thread thread;
  std::mutex mutex;
  std::condition_variable wake;
  bool stopping = false;
  bool finishing = false;
  bool watch_ended = false;
  bool abandoned = false;   // a thread (the watchdog, the join) was left stuck in a store call
  Clock::time_point answered = Clock::now();  // the store's last answer to the watchdog
  std::string verdict;  // who was lost, once known
  int lost_rank = -1;   // rank 0's watchdog: the rank it named in the verdict
  // A group is being set up: Gloo's connect waits the whole timeout for a
  // member that is gone, and nothing can be unwound meanwhile.
  bool setting_up = false;
  // Waits for a Gloo collective; gives up on a stop signal that a lost
  // rank keeps the ranks from acting on together.
  void wait_for(const c10::intrusive_ptr<c10d::Work>& work);
  // How long a watched rank may show no sign of life, and the store not
  // answer, while a stop signal waits: a few of the beats a live rank
  // makes, and no longer than the timeout.
  std::chrono::milliseconds stop_wait() const {
    return std::min(options.timeout, std::max(2 * interval, std::chrono::milliseconds(5000)));
  }

  void let_the_others_read_the_verdict();
  c10::intrusive_ptr<c10d::ProcessGroup> make_group(const std::string& name, int rank, int size);
  std::unique_ptr<ProcessGroupGroup> group(const std::string& name, const std::vector<int>& members);
  // Where the store is: a file, or a host and port; and where that was set.
  std::string store_path, store_host, store_where;
  std::uint16_t store_port = 0;

  void find_store(bool read_environment);
  // Gloo's network interfaces, the same for every group.
  std::vector<std::shared_ptr<::gloo::transport::Device>> gloo_devices;
  void pick_gloo_devices();
  void join_store();
  void join_store_within(std::chrono::milliseconds limit);
  void on_own_thread(const std::function<void()>& work, std::chrono::milliseconds limit,
                     const std::function<void()>& at_limit, const std::string& stopped_while, bool share_stops);
  void set_up_watched(const std::function<void()>& work, const std::string& name);
  void refuse_a_file_that_is_no_store() const;
  [[noreturn]] void stopped_elsewhere(const std::string& text);
  [[noreturn]] void stop_rendezvous(int signal, const char* when);
  // Between a joining rank's looks at the store: up to 2 s on large worlds,
  // to spare it.
  std::chrono::milliseconds join_pause() const {
    return std::chrono::milliseconds(std::clamp(layout.world_size * 10, 100, 2000));
  }
  // What a rank that leaves the rendezvous does besides counting itself
  // (leave_rendezvous).
  enum class Leaving {
    kPlain,
    kRefusing,   // it refused the world: the ranks still to come read why before it goes
    kAbandoned,  // its Impl is never freed: the last of the ranks to leave deletes a file store
  };
  void leave_rendezvous(const std::string& why, bool counted, Leaving how = Leaving::kPlain,
                        c10d::Store* via = nullptr, int ranks = 0) noexcept;
  void look_for_refusals(bool recent_only);
  void tell_stop(c10d::Store& s, int signal, const std::string& what, Leaving how) noexcept;
  // The ranks that have joined the store (of this run, or of an earlier
  // one that left it there): one counter, not a look per rank.
  static std::int64_t ranks_arrived(c10d::Store& s) { return s.add(kArrivedKey, 0); }
  void meet();
  void place();
  void watch();
  bool stop_watch();
  // The store's silence counts from `watched` on, when that is later than
  // its last answer.
  std::string unanswered_store(std::chrono::milliseconds limit, Clock::time_point watched = {}) const;
  std::string describe(int rank) const {
    return rank < static_cast<int>(hosts.size()) ? fmt::format("rank {} (host {})", rank, hosts[rank])
                                                  : fmt::format("rank {}", rank);
  }
  // A collective failed on this rank: waits for the watchdog to tell which
  // rank was lost, then throws RankLost.
  [[noreturn]] void lost(const std::string& what);
};

// A c10d process group behind the plugin-facing Group interface. Without a
// process group (one member) every operation is local.
class ProcessGroupGroup final : public Group {
 public:
  ProcessGroupGroup(Communicator::Impl& owner, c10::intrusive_ptr<c10d::ProcessGroup> pg, int rank, int size)
      : owner_(owner), pg_(std::move(pg)), rank_(rank), size_(size) {}

  int size() const override { return size_; }
  int rank() const override { return rank_; }

  void barrier() override {
    if (pg_) run([&] { owner_.wait_for(pg_->barrier()); });
  }

  void all_reduce_sum(at::Tensor& tensor) override {
    if (!pg_) return;
    std::vector<at::Tensor> tensors{tensor.is_contiguous() ? tensor : tensor.contiguous()};
    run([&] { wait(pg_->allreduce(tensors), tensor.is_cuda()); });
    if (!tensors[0].is_same(tensor)) tensor.copy_(tensors[0]);
  }

  at::Tensor all_gather(const at::Tensor& tensor) override {
    if (!pg_) return tensor.unsqueeze(0).clone();
    std::vector<at::Tensor> inputs{tensor.contiguous()};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int i = 0; i < size_; ++i) outputs[0].push_back(at::empty_like(inputs[0]));
    run([&] { wait(pg_->allgather(outputs, inputs), inputs[0].is_cuda()); });
    return at::stack(outputs[0]);
  }

  c10d::ProcessGroup* process_group() const { return pg_.get(); }

  // A collective on CPU tensors (Gloo's) is waited for in slices
  // (Impl::wait_for); NCCL's wait() only orders the current stream.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, bool on_cuda) {
    if (on_cuda)
      work->wait();
    else
      owner_.wait_for(work);
  }

  template <typename F>
  void run(F&& f) {
    try {
      f();
    } catch (const StopRequested&) {
      throw;
    } catch (const RankLost&) {
      throw;
    } catch (const std::exception& e) {
#if DEEPCAM_WITH_CUDA
      // Refused while this thread's stream is captured in a CUDA graph (an
      // NCCL that cannot be captured): the capture failed, no rank was lost,
      // and the engine names [run] cuda_graphs.
      if (owner_.options.cuda &&
          c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
        throw;
      }
#endif
      owner_.lost(e.what());
    }
  }

 private:
  Communicator::Impl& owner_;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int rank_, size_;
};

c10::intrusive_ptr<c10d::ProcessGroup> Communicator::Impl::make_group(const std::string& name, int rank, int size) {
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name + "/", store);
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(prefixed, rank, size);
  auto gloo_options = c10d::ProcessGroupGloo::Options::create();
  gloo_options->timeout = options.timeout;
  gloo_options->devices = gloo_devices;
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(c10::make_intrusive<c10d::PrefixStore>("gloo/", prefixed),
                                                          rank, size, gloo_options);
  // Barriers and CPU tensors go through Gloo also on CUDA runs.
  pg->setDefaultBackend(BackendType::GLOO);
  pg->setBackend(c10::DeviceType::CPU, BackendType::GLOO, gloo);
#if DEEPCAM_WITH_CUDA
  if (options.cuda) {
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = options.timeout;
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        c10::make_intrusive<c10d::PrefixStore>("nccl/", prefixed), rank, size, nccl_options);
    pg->setBackend(c10::DeviceType::CUDA, BackendType::NCCL, nccl);
  }
#endif
  return pg;
}

std::unique_ptr<ProcessGroupGroup> Communicator::Impl::group(const std::string& name, const std::vector<int>& members) {
  const auto me = std::find(members.begin(), members.end(), layout.rank);
  const int rank = static_cast<int>(me - members.begin());
  const int size = static_cast<int>(members.size());
  if (size == 1 && !options.group_of_one) return std::make_unique<ProcessGroupGroup>(*this, nullptr, 0, 1);
  struct SettingUp {
    Impl& impl;
    explicit SettingUp(Impl& i) : impl(i) { flag(true); }
    ~SettingUp() { flag(false); }
    void flag(bool on) {
      std::lock_guard<std::mutex> lock(impl.mutex);
      impl.setting_up = on;
    }
  } setting_up_now(*this);
  // Gloo's set-up waits for every member up to the timeout, deaf to a stop
  // signal. Once the watchdog runs, it ends this rank on one; before (the
  // world group), the set-up runs on a thread of its own, so that a stop
  // signal ends this rank meanwhile.
  auto pg = std::make_shared<c10::intrusive_ptr<c10d::ProcessGroup>>();
  try {
    if (thread.joinable()) {
      set_up_watched([this, pg, name, rank, size] { *pg = make_group(name, rank, size); }, name);
    } else {
      on_own_thread(
          [this, pg, name, rank, size] { *pg = make_group(name, rank, size); }, 2 * options.timeout + 2 * interval,
          [&] {
            throw Error(
                fmt::format("rank {} of {}: setting up the process group \"{}\" has not ended in "
                            "{} s",
                            layout.rank, layout.world_size, name, seconds(2 * options.timeout)));
          },
          fmt::format("while the ranks set up their process group \"{}\", which waits for every member", name),
          /*share_stops=*/true);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    // Meeting (no watchdog yet): meet() names it. Later, a member that
    // stopped never connects, and Gloo gives up after the timeout.
    if (!thread.joinable()) throw;
    lost(e.what());
  }
  return std::make_unique<ProcessGroupGroup>(*this, std::move(*pg), rank, size);
}

// Where the store is, from [run] rendezvous (and MASTER_ADDR / MASTER_PORT
// for "env", when `read_environment`); a setting that cannot work is an
// Error naming it.
void Communicator::Impl::find_store(bool read_environment) {
  const std::string& rv = options.rendezvous;
  const std::string& setting = options.rendezvous_setting;
  const int size = layout.world_size;
  if (rv.rfind("file://", 0) == 0) {
    store_path = rv.substr(7);
    if (store_path.empty() || store_path[0] != '/') {
      throw Error(fmt::format("{}: expected file:///ABSOLUTE/PATH on a file system all ranks share", setting));
    }
    // The store cannot create its file there: the ranks would wait out the
    // whole timeout, and then blame a lock.
    const std::string folder = store_path.substr(0, std::max<std::size_t>(store_path.rfind('/'), 1));
    struct stat st {};
    std::string problem;
    if (::stat(folder.c_str(), &st) != 0) problem = errno == ENOENT ? "no such directory" : std::strerror(errno);
    else if (!S_ISDIR(st.st_mode)) problem = "not a directory";
    else if (::access(folder.c_str(), W_OK | X_OK) != 0)
      problem = fmt::format("cannot create files there: {}", std::strerror(errno));
    if (!problem.empty()) {
      throw Error(fmt::format("{}: {}: {}; the store file's folder must exist, on a file system all ranks share",
                              setting, folder, problem));
    }
    return;
  }
  std::string port_text, port_where;
  if (rv == "env") {
    if (!read_environment) return;
    const char* addr = std::getenv("MASTER_ADDR");
    const char* port = std::getenv("MASTER_PORT");
    if (!addr || !*addr || !port || !*port) {
      throw Error(fmt::format("{}: {} ranks ({}) need MASTER_ADDR and MASTER_PORT (rank 0's host and a free port) "
                              "in the environment; or set rendezvous = \"tcp://HOST:PORT\" or \"file:///shared/path\"",
                              setting, size, layout.source));
    }
    store_host = addr;
    port_text = port;
    store_where = fmt::format("MASTER_ADDR and MASTER_PORT, read for {}", setting);
    port_where = fmt::format("MASTER_PORT (read for {})", setting);
  } else if (rv.rfind("tcp://", 0) == 0) {
    const std::string rest = rv.substr(6);
    const auto colon = rest.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      throw Error(fmt::format("{}: expected tcp://HOST:PORT", setting));
    }
    store_host = rest.substr(0, colon);
    // An IPv6 address in a URL's brackets, tcp://[::1]:29500, as
    // urllib.parse and c10d's own URLs write it: the address without them.
    if (store_host.size() > 2 && store_host.front() == '[' && store_host.back() == ']') {
      store_host = store_host.substr(1, store_host.size() - 2);
    }
    port_text = rest.substr(colon + 1);
    store_where = setting;
    port_where = store_where;
  } else {
    throw Error(fmt::format("{}: expected \"env\", \"tcp://HOST:PORT\" or \"file:///PATH\"", setting));
  }
  char* end = nullptr;
  const long port = std::strtol(port_text.c_str(), &end, 10);
  if (port_text.empty() || *end != '\0' || port < 1 || port > 65535) {
    throw Error(fmt::format("{}: port \"{}\" is not a number in 1..65535", port_where, port_text));
  }
  store_port = static_cast<std::uint16_t>(port);
}

// GLOO_SOCKET_IFNAME picks the interfaces, as in PyTorch (names separated
// by commas, used in turn); else the one the host name resolves to. A name
// Gloo cannot use is an Error ("cannot use ...", for the caller to put the
// rank before) naming the variable and this host's interfaces (Gloo's own
// says "enforce fail").
void Communicator::Impl::pick_gloo_devices() {
  const char* variable = std::getenv("GLOO_SOCKET_IFNAME");
  if (!variable || !*variable) {
    gloo_devices = {c10d::ProcessGroupGloo::createDefaultDevice()};
    return;
  }
  const std::string names = variable;
  for (std::size_t at = 0; at <= names.size();) {
    const std::size_t comma = std::min(names.find(',', at), names.size());
    const std::string ifname = names.substr(at, comma - at);
    at = comma + 1;
    try {
      if (ifname.empty()) throw std::invalid_argument("an empty name");
      gloo_devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } catch (const std::exception& e) {
      const std::vector<std::string> here = interfaces();
      const bool known = std::find(here.begin(), here.end(), ifname) != here.end();
      std::string why =
          known || ifname.empty() ? first_line(e.what()) : "no network interface of that name has an address here";
      // Gloo's "[enforce fail at FILE:LINE] CONDITION. " before its words.
      if (const auto words = why.rfind(". ");
          known && why.rfind("[enforce fail", 0) == 0 && words != std::string::npos) {
        why = why.substr(words + 2);
      }
      throw Error(fmt::format(
          "cannot use GLOO_SOCKET_IFNAME={}{} on host {}: {} (its interfaces: {}); name one of "
          "them, or several separated by commas, or unset the variable for the interface the "
          "host name resolves to",
          names, names == ifname ? "" : fmt::format(" (\"{}\")", ifname), hostname(), why, fmt::join(here, ", ")));
    }
  }
}

// Connects to the store (rank 0 hosts a TCP one) and joins it.
void Communicator::Impl::join_store() {
  const int rank = layout.rank, size = layout.world_size;
  if (store_path.empty()) {
    // A name that does not resolve never will: c10d would retry until the
    // timeout and then blame the port or the other ranks. (A resolver that
    // is not answering, EAI_AGAIN, may answer later.)
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    const int resolved = ::getaddrinfo(store_host.c_str(), nullptr, &hints, &found);
    if (found) ::freeaddrinfo(found);
    if (resolved == EAI_NONAME || resolved == EAI_FAIL
#ifdef EAI_NODATA
        || resolved == EAI_NODATA
#endif
    ) {
      throw Error(fmt::format("rank {} of {}: the rendezvous host \"{}\" ({}) does not resolve: {}; it must name "
                              "rank 0's host, as every rank reaches it",
                              rank, size, store_host, store_where, ::gai_strerror(resolved)));
    }
    c10d::TCPStoreOptions o;
    o.port = store_port;
    o.isServer = rank == 0;
    o.numWorkers = static_cast<std::size_t>(size);
    // Every rank's arrival is waited for below, where a rank that refuses
    // this world is seen at once.
    o.waitWorkers = false;
    o.timeout = options.timeout;
    // Rank 0's store reached first: c10d's client, given no listener, logs
    // each failed try with a C++ backtrace and retries past the timeout, and
    // the wait then reads as a port held by a process that never answers.
    if (rank != 0) {
      const auto stopped = [&](int signal) { stop_rendezvous(signal, "before rank 0's store answered"); };
      if (const std::string error = reach(store_host, store_port, Clock::now() + options.timeout, stopped);
          !error.empty()) {
        throw Error(fmt::format("rank {} of {}: no rendezvous store answered at {}:{} ({}) within {} s ({}): {}; "
                                "rank 0 hosts it: it has not started, or the address or port is not its",
                                rank, size, store_host, store_port, store_where, seconds(options.timeout),
                                options.timeout_where, error));
      }
    }
    try {
      store = c10::make_intrusive<c10d::TCPStore>(store_host, o);
    } catch (const c10::Error& e) {
      // Rank 0 fails at once when it cannot listen on the port; the others
      // wait for it up to the timeout, which meet() names.
      const std::string what = first_line(e.what());
      if (rank != 0 || what.find("failed to listen") == std::string::npos) throw;
      throw Error(fmt::format("rank 0 of {}: could not host the rendezvous store on port {} ({}): {}{}", size,
                              store_port, store_where, what,
                              what.find("EADDRINUSE") != std::string::npos
                                  ? "; another process (an earlier run, another program) holds the port: give the "
                                    "run a free port"
                                  : ""));
    }
  } else {
    // c10d deletes the file once the last FileStore on it, of any process,
    // has gone, if as many have gone over the file's life as its number of
    // workers: 1, so that a failed rendezvous, whoever came, leaves no file
    // (the world size would need every rank to have come, and counts across
    // the runs a killed one left the file to). A process killed outright
    // keeps its count: the file stays, and the next run names it.
    refuse_a_file_that_is_no_store();
    store = c10::make_intrusive<c10d::FileStore>(store_path, 1);
    store->setTimeout(options.timeout);
  }
  // Each rank joins once, all with one world size: two processes started
  // as the same rank, ranks told different sizes, or a file store that a
  // killed run left behind would otherwise wait on each other until the
  // timeout and say nothing of why. A rank that gives up tells the others
  // (leave_rendezvous), who stop at once too.
  if (store->add(rank_key(rank), 1) != 1) {
    const std::string why =
        !store_path.empty()
            ? fmt::format("{}: rank {} has joined this store before: a run that did not end left the file "
                          "behind, or another process was started as rank {} too; delete the file or give each "
                          "run a new path",
                          options.rendezvous_setting, rank, rank)
            : fmt::format("another process joined the rendezvous as rank {} too ({}); give each process its "
                          "own rank",
                          rank, layout.rank_variable);
    // Not counted as one that left: the file may be another run's.
    leave_rendezvous(why, /*counted=*/false);
    throw Error(fmt::format("rank {} of {}: {}", rank, size, why));
  }
  store->add(kArrivedKey, 1);
  // A refusal or a stop of this run's, from a rank that came before this
  // one; else ranks that left the store before this one came are an
  // earlier run's, whose refusals and stops are not this run's (one of its
  // ranks was killed, and the file stayed).
  look_for_refusals(/*recent_only=*/true);
  if (const std::int64_t gone = store->add(kLeftKey, 0); gone > 0 && !store_path.empty()) {
    throw Error(
        fmt::format("rank {} of {}: {}: {} rank(s) had left this store before this rank came (a run that "
                    "ended without meeting, and one of whose ranks was killed, left the file behind; or "
                    "this run's ranks ended before this rank came); delete the file or give each run a new "
                    "path",
                    rank, size, options.rendezvous_setting, gone));
  }
  // Before the others wait on this rank in the process groups' set-up.
  try {
    pick_gloo_devices();
  } catch (const Error& e) {
    leave_rendezvous(fmt::format("rank {} {}", rank, e.what()), /*counted=*/true, Leaving::kRefusing);
    throw Error(fmt::format("rank {} of {} {}", rank, size, e.what()));
  }
  const auto pause = join_pause();
  const auto deadline = Clock::now() + options.timeout;
  // Rank 0's word on the world size, and then every rank's arrival, polled:
  // a rank that refused this world, or was stopped, is named at once, where
  // the process groups' set-up would wait for it until the timeout.
  const auto look = [&](const std::function<bool()>& arrived) {
    for (;;) {
      if (const int signal = stop_requested()) stop_rendezvous(signal, "while the ranks met");
      look_for_refusals(/*recent_only=*/false);
      if (arrived()) return true;
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(pause);
    }
  };
  if (rank == 0) store->set("deepcam/world_size", bytes_of(std::to_string(size)));
  if (!look([&] { return store->check({"deepcam/world_size"}); })) {
    leave_rendezvous(fmt::format("rank {} gave up waiting for rank 0 after {} s", rank, seconds(options.timeout)),
                     /*counted=*/true);
    throw std::runtime_error("rank 0 did not arrive");
  }
  const std::string rank0_size = text_of(store->get("deepcam/world_size"));
  if (rank0_size != std::to_string(size)) {
    leave_rendezvous(fmt::format("rank {} was started for a world of {} ranks ({}), rank 0 for {}; start every "
                                 "rank with the same world size",
                                 rank, size, layout.source, rank0_size),
                     /*counted=*/true, Leaving::kRefusing, nullptr, std::min(size, std::atoi(rank0_size.c_str())));
    throw Error(fmt::format("rank {}: this process was started for a world of {} ranks ({}), rank 0 for {}; start "
                            "every rank with the same world size",
                            rank, size, layout.source, rank0_size));
  }
  // Then every rank's arrival, and a word from each to show it is of this
  // run: a file store that an earlier run left holds its ranks' keys, and
  // a rank that took them for this run's would wait in the world group's
  // set-up until the timeout for a process long gone. Each rank's token is
  // new: rank 0 lists them all with its own (the roster), and each rank
  // answers with rank 0's.
  std::random_device random;
  // Its Gloo interfaces' count after "/": Gloo connects every pair of
  // ranks once per interface, so ranks with other counts would wait on
  // each other until the timeout.
  const std::string token = fmt::format("{:08x}{:08x}-{}/{}", random(), random(), ::getpid(), gloo_devices.size());
  store->set(heartbeat_key(rank), bytes_of("0"));
  store->set(joined_key(rank), bytes_of(token));
  std::vector<std::string> joined, answers;
  for (int r = 0; r < size; ++r) {
    joined.push_back(joined_key(r));
    if (r > 0) answers.push_back(answer_key(r));
  }
  // Rank 0's token once the roster has come; rank 0's word that every rank
  // answered it ends the wait, so that all leave the wait together (a stop
  // on one reaches the others while they still look).
  std::string rank0_token = rank == 0 ? token : "";
  const auto all_answered = [&] {
    if (!store->check(answers)) return false;
    const auto all = store->multiGet(answers);
    return std::all_of(all.begin(), all.end(), [&](const auto& a) { return text_of(a) == rank0_token; });
  };
  bool met = false;
  if (rank == 0) {
    met = look([&] { return store->check(joined); });
    if (met) {
      std::string roster = token;
      const auto tokens = store->multiGet(joined);
      for (int r = 1; r < size; ++r) {
        const std::string theirs = text_of(tokens[static_cast<std::size_t>(r)]);
        const std::string count = theirs.substr(std::min(theirs.rfind('/') + 1, theirs.size()));
        if (count != std::to_string(gloo_devices.size())) {
          const std::string why = fmt::format(
              "rank {} uses {} Gloo network interface(s) (GLOO_SOCKET_IFNAME), rank 0 {}; give every rank as many", r,
              count, gloo_devices.size());
          leave_rendezvous(why, /*counted=*/true, Leaving::kRefusing);
          throw Error(fmt::format("rank 0 of {}: {}", size, why));
        }
      }
      for (const auto& t : tokens) roster += " " + text_of(t);
      store->set(kRosterKey, bytes_of(roster));
      met = look(all_answered);
      if (met) store->set(kMetKey, bytes_of(token));
    }
  } else {
    met = look([&] {
      if (!store->check({kRosterKey})) return false;
      const std::string roster = text_of(store->get(kRosterKey));
      if (roster.find(" " + token) == std::string::npos) return false;  // an earlier run's
      rank0_token = roster.substr(0, roster.find(' '));
      store->set(answer_key(rank), bytes_of(rank0_token));
      return true;
    });
    if (met) met = look([&] { return store->check({kMetKey}) && text_of(store->get(kMetKey)) == rank0_token; });
  }
  if (!met) {
    std::vector<int> missing;
    for (int r = 0; r < size; ++r) {
      if (!store->check({joined_key(r)})) missing.push_back(r);
    }
    // Every rank's key there, some an earlier run's: those that did not
    // answer rank 0's roster (once it came), else rank 0, which never wrote it.
    if (missing.empty() && !rank0_token.empty()) {
      for (int r = 1; r < size; ++r) {
        if (!store->check({answer_key(r)}) || text_of(store->get(answer_key(r))) != rank0_token) {
          missing.push_back(r);
        }
      }
    }
    if (missing.empty()) missing.push_back(0);
    leave_rendezvous(fmt::format("rank {} gave up waiting for rank(s) {} after {} s", rank, fmt::join(missing, ", "),
                                 seconds(options.timeout)),
                     /*counted=*/true);
    throw std::runtime_error(fmt::format("rank(s) {} did not arrive", fmt::join(missing, ", ")));
  }
}

// Another rank was stopped by a signal as the ranks met (kStoppedKey's
// `text`): so is this one, as one rank's stop in training stops every rank.
void Communicator::Impl::stopped_elsewhere(const std::string& text) {
  const auto space = text.find(' ');
  const int signal = std::atoi(text.c_str());
  throw StopRequested(signal > 0 && signal < NSIG ? signal : SIGTERM,
                      fmt::format("rank {} of {}: {}; this rank stops too, and the run had not started", layout.rank,
                                  layout.world_size, space == std::string::npos ? text : text.substr(space + 1)));
}

// This rank was stopped by `signal` in the rendezvous: the others are told
// (they stop too, as one rank's stop in training stops every rank), and
// StopRequested ends this one. Nothing was written yet.
void Communicator::Impl::stop_rendezvous(int signal, const char* when) {
  const std::string what = fmt::format("stopped by {} {}", strsignal(signal), when);
  if (store) tell_stop(*store, signal, what, Leaving::kPlain);
  throw StopRequested(signal, fmt::format("rank {} of {}: {} (through {}); the run had not started", layout.rank,
                                          layout.world_size, what, options.rendezvous_setting));
}

// Writes this rank's stop (`what`: "stopped by SIGNAL ...") where the
// others look, unless one is there already, and leaves the rendezvous.
void Communicator::Impl::tell_stop(c10d::Store& s, int signal, const std::string& what, Leaving how) noexcept {
  try {
    if (!s.check({kStoppedKey})) {
      s.set(kStoppedKey, stamped(fmt::format("{} rank {} was {}", signal, layout.rank, what)));
    }
  } catch (const std::exception&) {
    // The store is gone: its host stopped too.
  }
  leave_rendezvous("", /*counted=*/true, how, &s);
}

// A rank gives up the rendezvous: `why` (unless "") is where the others
// look, and they stop at once rather than wait out the timeout. A rank
// `counted` counts itself in kLeftKey: a rank that comes later then knows
// the store's old refusals and stops from its own run's. A refusing rank
// waits, up to kRefusalLinger, for the ranks still to come to read why
// (c10d deletes a file store, and a TCP store goes, with the last process
// using it); the host of a TCP store (rank 0) waits for the ranks there to
// have looked. An abandoned rank (its store never freed) that is the last
// of those that came to leave deletes a file store. Through `via` when the
// store's own client may be held by a thread left stuck in it. `ranks`:
// how many a refusing rank waits for, if not the world's size. Never
// throws.
void Communicator::Impl::leave_rendezvous(const std::string& why, bool counted, Leaving how, c10d::Store* via,
                                          int ranks) noexcept {
  try {
    c10d::Store& s = via ? *via : *store;
    if (!why.empty() && !s.check({kRefusedKey})) s.set(kRefusedKey, stamped(why));
    const std::int64_t left = counted ? s.add(kLeftKey, 1) : 0;
    if (how == Leaving::kRefusing) {
      const auto until = Clock::now() + std::min<std::chrono::milliseconds>(options.timeout, kRefusalLinger);
      const std::int64_t expected = ranks > 0 ? ranks : layout.world_size;
      while (ranks_arrived(s) < expected && Clock::now() < until) std::this_thread::sleep_for(join_pause());
    }
    if (store_path.empty() && layout.rank == 0) std::this_thread::sleep_for(2 * join_pause());
    if (how == Leaving::kAbandoned && counted && !store_path.empty() && left >= ranks_arrived(s)) {
      ::unlink(store_path.c_str());
    }
  } catch (const std::exception&) {
    // The store is gone: the others find out by themselves.
  }
}

// Another rank's stop (this one stops too) or refusal (an Error naming
// it), if the store holds one; with `recent_only`, only one written in this
// run's time.
void Communicator::Impl::look_for_refusals(bool recent_only) {
  for (const char* key : {kStoppedKey, kRefusedKey}) {
    if (!store->check({key})) continue;
    const auto [text, recent] = unstamped(store->get(key));
    if (recent_only && !recent) continue;
    leave_rendezvous("", /*counted=*/true);
    if (key == kStoppedKey) stopped_elsewhere(text);
    throw Error(fmt::format("rank {} of {}: {}", layout.rank, layout.world_size, text));
  }
}

// Runs `work` on a thread of its own and waits for it, at most `limit`
// (then `at_limit` throws). The c10d calls it makes may wait long, or for
// ever (a store's answers are read without a timeout; Gloo's set-up waits
// the timeout for a member that is gone), and nothing unwinds them. A stop
// signal gives the work a few seconds to end by itself (a join looks at the
// signal between its looks at the store, and rank 0 then waits for the
// others to have read it); then StopRequested ends this rank, "stopped by
// SIGNAL `stopped_while`". With `share_stops`, this rank's stop is written
// where the others look, and another's ends this rank at once (the work
// waits for every rank). A thread left behind keeps this Impl (`abandoned`:
// the Communicator leaks it).
void Communicator::Impl::on_own_thread(const std::function<void()>& work, std::chrono::milliseconds limit,
                                       const std::function<void()>& at_limit, const std::string& stopped_while,
                                       bool share_stops) {
  Background worker(work);
  auto deadline = Clock::now() + limit;
  int signal = 0;
  std::string elsewhere;  // another rank's stop (share_stops)
  // A client of its own: the work's may wait in the store for a whole
  // timeout (a TCP store's client answers one call at a time).
  c10::intrusive_ptr<c10d::Store> looks = share_stops ? store->clone() : nullptr;
  while (!worker.ended_within(std::chrono::milliseconds(100))) {
    if (signal == 0 && (signal = stop_requested()) != 0) {
      deadline = std::min(deadline, Clock::now() + 4 * join_pause() + std::chrono::seconds(2));
    }
    if (looks) {
      try {
        if (looks->check({kStoppedKey})) {
          if (auto [text, recent] = unstamped(looks->get(kStoppedKey)); recent) elsewhere = text;
        }
      } catch (const std::exception&) {
        // The store's host is gone: the work fails by itself.
      }
    }
    if (elsewhere.empty() && Clock::now() < deadline) continue;
    worker.leave_behind();
    abandoned = true;
    if (!elsewhere.empty()) {
      leave_rendezvous("", /*counted=*/true, Leaving::kAbandoned, looks.get());
      stopped_elsewhere(elsewhere);
    }
    if (signal != 0) {
      const std::string what = fmt::format("stopped by {} {}", strsignal(signal), stopped_while);
      if (looks) tell_stop(*looks, signal, what, Leaving::kAbandoned);
      throw StopRequested(signal, fmt::format("rank {} of {}: {}", layout.rank, layout.world_size, what));
    }
    at_limit();
    throw std::logic_error("on_own_thread: at_limit returned");
  }
  worker.join();
}

// A group's set-up while the watchdog runs, on a thread of its own. c10d
// waits for a store's answers without a timeout, so a store whose host
// (rank 0) hangs (a frozen node, a SIGSTOP) would hold the set-up, and the
// watchdog with it in a call of its own, for ever. Once the store has not
// answered the watchdog for the timeout (for stop_wait() while a stop
// signal waits, when the watchdog, had it looked, would have ended this
// rank), the set-up is given up and this rank unwinds as a lost rank does
// (RankLost; StopRequested on a stop signal). The set-up's thread is left
// in its call, and the Impl with it (`abandoned`). Whatever else fails is
// the watchdog's to name (a member's heartbeat) or Gloo's (its timeout).
void Communicator::Impl::set_up_watched(const std::function<void()>& work, const std::string& name) {
  constexpr std::chrono::milliseconds kLook{100};
  Background worker(work);
  AwakeSince awake(kLook);
  while (!worker.ended_within(kLook)) {
    const auto since = awake.look();
    const int signal = stop_requested();
    std::string why;
    {
      std::lock_guard<std::mutex> lock(mutex);
      why = unanswered_store(signal != 0 ? stop_wait() : options.timeout, since);
      if (why.empty()) continue;
      abandoned = true;
      if (verdict.empty()) verdict = why;
    }
    worker.leave_behind();
    if (signal != 0) {
      throw StopRequested(signal, fmt::format("rank {} of {}: stopped by {} while the ranks set up a process group, "
                                              "which waits for every member ({})",
                                              layout.rank, layout.world_size, strsignal(signal), why));
    }
    throw RankLost(fmt::format("rank {}: {}; this rank stops too (it was setting up the process group \"{}\", "
                               "which waits for every member)",
                               layout.rank, why, name));
  }
  worker.join();
}

// A file at the store's path that no c10d FileStore wrote (a run file
// named there by mistake, any other file) held every rank for the whole
// timeout, blaming a stopped process for the store's lock: FileStore reads
// it as records whose ends it waits for. A store's file starts with the
// record its constructor writes first, "refcount/" after its length (a
// 32-bit count); one another rank is writing right now, with a part of it.
void Communicator::Impl::refuse_a_file_that_is_no_store() const {
  static constexpr char kFirstRecord[] = "\x09\x00\x00\x00refcount/";
  constexpr std::size_t kFirstBytes = sizeof kFirstRecord - 1;
  std::FILE* file = std::fopen(store_path.c_str(), "rb");
  if (!file) return;  // none yet, or one FileStore names itself
  char head[kFirstBytes] = {};
  const std::size_t got = std::fread(head, 1, kFirstBytes, file);
  std::fclose(file);
  if (std::memcmp(head, kFirstRecord, got) == 0) return;
  throw Error(fmt::format("rank {} of {}: {}: {} is a file that no c10d store wrote (it does not start as one); "
                          "name a file that does not exist yet, a new one for each run",
                          layout.rank, layout.world_size, options.rendezvous_setting, store_path));
}

// join_store, waited for at most `limit`. c10d reads the store's answers
// without a timeout, so a port held by a process that takes the connection
// and never answers (a stopped run's rank 0, another program) would hold
// this rank for ever, as would a file store whose lock a stopped process
// holds.
void Communicator::Impl::join_store_within(std::chrono::milliseconds limit) {
  const auto at_limit = [&] {
    const std::string store_text =
        store_path.empty() ? fmt::format("the store at {}:{} ({}) took the connection but", store_host, store_port,
                                         store_where)
                           : fmt::format("the store file {} ({})", store_path, options.rendezvous_setting);
    const std::string held = store_path.empty() ? "the port is held by a process that is stopped or is not this "
                                                  "run's rank 0 (an earlier run, another program); give the run "
                                                  "a free port"
                                                : "a stopped process holds its lock (an earlier run's rank); give "
                                                  "the run a new path";
    throw Error(fmt::format("rank {} of {}: {} has not answered for {} s: {}", layout.rank, layout.world_size,
                            store_text, seconds(std::chrono::duration_cast<std::chrono::milliseconds>(limit)), held));
  };
  on_own_thread([this] { join_store(); }, limit, at_limit,
                fmt::format("while the ranks met (through {}), whose store was not answering; the run had not "
                            "started",
                            options.rendezvous_setting),
                /*share_stops=*/false);
}

// Rendezvous, the world group, and who runs where.
void Communicator::Impl::meet() {
  const int rank = layout.rank, size = layout.world_size;
  find_store(/*read_environment=*/true);
  try {
    // Connecting waits up to the timeout for rank 0, and the world size up
    // to another for every rank to have connected.
    join_store_within(2 * options.timeout + 2 * interval);
    world = group("world", [&] {
      std::vector<int> all(static_cast<std::size_t>(size));
      for (int r = 0; r < size; ++r) all[static_cast<std::size_t>(r)] = r;
      return all;
    }());
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    // The variables that made this process one of many: stale ones (a batch
    // script's own process under Slurm's) are a common cause.
    throw Error(fmt::format("rank {} of {} ({} and {}, {}): could not meet the other ranks through {} within {} s "
                            "({}): {}",
                            rank, size, layout.rank_variable, layout.size_variable, layout.source,
                            options.rendezvous_setting, seconds(options.timeout), options.timeout_where,
                            first_line(e.what())));
  }

}

// Host names and the launcher's local ranks, through one all-gather of
// fixed-size buffers, and the node's group. Every rank checks every rank's
// local variables, so that all refuse the run at once instead of waiting
// for the one that refused it.
void Communicator::Impl::place() {
  const int rank = layout.rank, size = layout.world_size;
  constexpr std::int64_t kNameBytes = 256;
  constexpr std::int64_t kBytes = kNameBytes + 2 * sizeof(std::int64_t);
  at::Tensor mine = at::zeros({kBytes}, at::kByte);
  const std::string me = hostname().substr(0, kNameBytes - 1);
  std::copy(me.begin(), me.end(), mine.data_ptr<std::uint8_t>());
  const std::int64_t given[2] = {layout.local_rank, layout.local_size};
  std::memcpy(mine.data_ptr<std::uint8_t>() + kNameBytes, given, sizeof given);
  const at::Tensor all = world->all_gather(mine);
  std::map<std::string, int> per_host;
  std::vector<std::array<std::int64_t, 2>> launched(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) {
    const std::uint8_t* bytes = all[r].data_ptr<std::uint8_t>();
    hosts.emplace_back(reinterpret_cast<const char*>(bytes));
    std::memcpy(launched[static_cast<std::size_t>(r)].data(), bytes + kNameBytes, 2 * sizeof(std::int64_t));
    ++per_host[hosts.back()];
  }
  nodes = static_cast<int>(per_host.size());
  for (const auto& [h, n] : per_host) max_local_size = std::max(max_local_size, n);
  auto node_of = [&](int r) {
    std::vector<int> members;
    for (int other = 0; other < size; ++other) {
      if (hosts[static_cast<std::size_t>(other)] == hosts[static_cast<std::size_t>(r)]) members.push_back(other);
    }
    return members;
  };
  // This rank's own mismatch first: its message names its variables.
  std::vector<int> order{rank};
  for (int r = 0; r < size; ++r) {
    if (r != rank) order.push_back(r);
  }
  for (int r : order) {
    const std::vector<int> members = node_of(r);
    const auto local_rank = static_cast<std::int64_t>(std::find(members.begin(), members.end(), r) - members.begin());
    const auto local_size = static_cast<std::int64_t>(members.size());
    const auto [said_rank, said_size] = launched[static_cast<std::size_t>(r)];
    if (said_rank < 0 || (said_rank == local_rank && said_size == local_size)) continue;
    // The launcher's count and the host names disagree: the node's ranks
    // would pick the same GPU, or share a staging folder wrongly.
    if (r == rank) {
      throw Error(fmt::format("rank {}: environment variables {} ({}) say local rank {} of {}, but {} of the ranks "
                              "run on host {} (ranks {}), which makes this one local rank {}; start the ranks with "
                              "the launcher's own local variables, or unset them",
                              rank, layout.local_variables, layout.source, said_rank, said_size, local_size, me,
                              fmt::join(members, ", "), local_rank));
    }
    throw Error(fmt::format("rank {} of {} refuses the run (see its message): its launcher's variables say local rank "
                            "{} of {}, but {} of the ranks run on host {} (ranks {}), which makes it local rank {}",
                            r, size, said_rank, said_size, local_size, hosts[static_cast<std::size_t>(r)],
                            fmt::join(members, ", "), local_rank));
  }
  const std::vector<int> members = node_of(rank);
  if (layout.local_rank < 0) {
    layout.local_rank = static_cast<int>(std::find(members.begin(), members.end(), rank) - members.begin());
    layout.local_size = static_cast<int>(members.size());
  }
  node = group(fmt::format("node{}", members.front()), members);
}

void Communicator::Impl::watch() {
  // A connection of its own: the store's client is not shared with the
  // process groups' set-up.
  c10::intrusive_ptr<c10d::Store> s = store->clone();
  const int size = layout.world_size;
  std::vector<std::string> keys;
  for (int r = 0; r < size; ++r) keys.push_back(heartbeat_key(r));
  std::vector<std::string> last(static_cast<std::size_t>(size));
  std::vector<Clock::time_point> changed(static_cast<std::size_t>(size), Clock::now());
  Clock::time_point looked = Clock::now();  // this thread's last look at the heartbeats
  std::chrono::milliseconds paused = interval;  // the pause it took before this look
  // Since when it has looked at the heartbeats with a stop signal waiting,
  // without a pause of its own process between.
  Clock::time_point stop_watched{};
  std::int64_t beat = 0;
  Clock::time_point stop_seen{};  // when a stop signal was first seen during a group's set-up
  struct Ended {
    Impl& impl;
    ~Ended() {
      std::lock_guard<std::mutex> ended_lock(impl.mutex);
      impl.watch_ended = true;
      impl.wake.notify_all();
    }
  } ended{*this};  // declared before `lock`, so it runs after lock is released
  // Ends this rank on a stop signal while a group is set up (`why`: the
  // rank the watchdog named lost, if it did).
  const auto stop_in_set_up = [&](int signal, const std::string& why) {
    std::fprintf(stderr,
                 "deepcam-host: rank %d of %d: stopped by %s while the ranks set up a process group, which "
                 "waits for every member%s; stopping\n",
                 layout.rank, layout.world_size, strsignal(signal), why.empty() ? "" : (" (" + why + ")").c_str());
    std::fflush(stderr);
    // The others' watchdogs name this rank at once, not after the timeout.
    try {
      s->set(heartbeat_key(layout.rank), bytes_of(kFailed));
    } catch (const std::exception&) {
      // The store's host is gone too.
    }
    std::_Exit(128 + signal);
  };
  std::unique_lock<std::mutex> lock(mutex);
  while (!stopping && verdict.empty()) {
    lock.unlock();
    std::string found;
    // A stop signal here, while a watched rank shows no sign of life, would
    // wait out the timeout: the ranks agree in a collective on a step to
    // stop at, and that rank holds it. It is named lost sooner (wait_for()).
    const bool stop_waits = stop_requested() != 0;
    const auto limit = stop_waits ? stop_wait() : options.timeout;
    try {
      s->set(heartbeat_key(layout.rank), bytes_of(std::to_string(++beat)));
      // Rank 0 watches every rank; the others watch rank 0 and read its word.
      std::vector<int> watched;
      if (layout.rank == 0) {
        for (int r = 1; r < size; ++r) watched.push_back(r);
      } else {
        watched.push_back(0);
      }
      std::vector<std::string> watched_keys;
      for (int r : watched) watched_keys.push_back(keys[static_cast<std::size_t>(r)]);
      const auto values = s->multiGet(watched_keys);
      // Read after the heartbeats: rank 0 writes its verdict before it marks
      // itself failed, so a rank 0 seen failed here for another rank's fault
      // has its verdict there to read, naming that rank, not rank 0.
      if (layout.rank != 0 && s->check({kLostKey})) {
        found = text_of(s->get(kLostKey));
        s->add(kLostReadKey, 1);
      }
      const auto now = Clock::now();
      {
        std::lock_guard<std::mutex> answered_lock(mutex);
        answered = now;
      }
      // This process did not run for a while (SIGSTOP and SIGCONT to every
      // rank, Slurm's suspend and resume): every heartbeat is behind by as
      // much, and the others' have yet to move on. What went unseen counts
      // for none.
      const bool was_paused = now - looked > paused + std::chrono::seconds(1);
      if (was_paused) std::fill(changed.begin(), changed.end(), now);
      looked = now;
      // With a stop signal waiting, a rank is named lost after a shorter
      // silence, but only once every rank has had a beat's time and a
      // second, since the signal or this process's pause, to show life: a
      // live one beats at least that often (faster while its own stop
      // waits), also when it resumed a little after this one.
      if (!stop_waits) {
        stop_watched = Clock::time_point{};
      } else if (stop_watched == Clock::time_point{} || was_paused) {
        stop_watched = now;
      }
      const bool judged = !stop_waits || now - stop_watched > interval + std::chrono::seconds(1);
      for (std::size_t i = 0; i < watched.size() && found.empty(); ++i) {
        const auto r = static_cast<std::size_t>(watched[i]);
        const std::string v = text_of(values[i]);
        if (v == kDone) continue;
        if (v == kFailed) {
          found = fmt::format("lost {}: it stopped with an error of its own (see its output)",
                              describe(static_cast<int>(r)));
        } else if (v != last[r]) {
          last[r] = v;
          changed[r] = now;
        } else if (judged && now - changed[r] > limit) {
          found = stop_waits ? fmt::format("lost {}: no sign of life for {} s, while a stop signal waited for it",
                                           describe(static_cast<int>(r)), seconds(limit))
                             : fmt::format("lost {}: no sign of life for {} s ({} = {})", describe(static_cast<int>(r)),
                                           seconds(limit), options.timeout_where, seconds(options.timeout));
        }
        if (!found.empty() && layout.rank == 0) lost_rank = static_cast<int>(r);
      }
      if (!found.empty() && layout.rank == 0) s->set(kLostKey, bytes_of(found));
    } catch (const std::exception& e) {
      lock.lock();
      if (finishing || stopping) return;
      lock.unlock();
      found = options.rendezvous == "env" || options.rendezvous.rfind("tcp://", 0) == 0
                  ? fmt::format("lost {}, which holds the rendezvous store: {}", describe(0), first_line(e.what()))
                  : fmt::format("lost the rendezvous store {}: {}", options.rendezvous, first_line(e.what()));
    }
    lock.lock();
    if (!found.empty()) verdict = found;
    // A stop signal while a group is set up: the main thread cannot look at
    // it before Gloo's set-up ends, which waits the timeout for a member
    // that is gone. Given a few seconds to end by itself, this rank stops.
    const int signal = verdict.empty() && setting_up ? stop_requested() : 0;
    if (signal == 0) {
      stop_seen = Clock::time_point{};
    } else if (stop_seen == Clock::time_point{}) {
      stop_seen = Clock::now();
    } else if (Clock::now() - stop_seen > std::chrono::seconds(5)) {
      stop_in_set_up(signal, "");
    }
    // Beats come faster while a stop signal waits, so that a live rank is
    // not taken for a lost one within stop_wait().
    if (verdict.empty()) {
      paused = signal || stop_requested() ? std::min(interval, join_pause()) : interval;
      wake.wait_for(lock, paused, [&] { return stopping; });
    }
  }
  if (stopping) return;
  // Someone was lost. The main thread normally learns it from a failed
  // collective and unwinds (removing what it had half-written); if it is
  // still busy after another timeout, nothing it waits for can come.
  wake.notify_all();
  // In a group's set-up the main thread cannot learn it before Gloo's
  // timeout: this rank stops at once; on the stop signal, if one waits, as
  // when no rank was named.
  if (const int signal = setting_up ? stop_requested() : 0) stop_in_set_up(signal, verdict);
  if (!setting_up && wake.wait_for(lock, options.timeout, [&] { return stopping; })) return;
  std::fprintf(stderr, "deepcam-host: rank %d: %s; stopping\n", layout.rank, verdict.c_str());
  std::fflush(stderr);
  std::_Exit(kRankLostStatus);
}

// A stop signal that the ranks cannot act on together. They agree in a
// collective on the step to stop at, and a rank that shows no sign of life
// (a hung node, a SIGSTOP) holds the collective this rank waits in, deaf to
// the signal, up to the timeout (30 minutes by default: a launcher's or
// Slurm's SIGKILL comes first, naming no one). So a Gloo collective is
// waited for in slices, and once a stop signal waits while the watchdog has
// named a lost rank, or rank 0's TCP store has not answered for stop_wait()
// (rank 0 hangs, and this rank's watchdog with it, in a store call), this
// rank gives up on it: StopRequested unwinds it as any error does (its log
// closed as an aborted run, its temporaries and staged copies removed), and
// it exits with 128 + the signal. The collective stays in flight on Gloo's
// thread, which nothing can end: the Impl is abandoned with it. (A file
// store on a busy shared file system may be slow to answer; a lost rank
// there shows in its heartbeat.)
void Communicator::Impl::wait_for(const c10::intrusive_ptr<c10d::Work>& work) {
  constexpr std::chrono::milliseconds kSlice{200};
  AwakeSince awake(kSlice);
  for (;;) {
    try {
      work->wait(kSlice);
      return;
    } catch (const std::exception&) {
      // The slice ran out ("Operation timed out!"), unless the collective
      // ended meanwhile, failed or not: then its own outcome stands.
      if (work->isCompleted()) {
        work->wait();
        return;
      }
    }
    const auto since = awake.look();
    const int signal = stop_requested();
    if (signal == 0) continue;
    std::string why;
    bool named = false;  // rank 0 named the lost rank
    {
      std::lock_guard<std::mutex> lock(mutex);
      why = !verdict.empty() || !store_path.empty() ? verdict : unanswered_store(stop_wait(), since);
      named = !verdict.empty() && lost_rank >= 0;
      if (!why.empty()) abandoned = true;
    }
    if (why.empty()) continue;
    // Rank 0's TCP store goes with it: the others read which rank it named first.
    if (named) {
      try {
        let_the_others_read_the_verdict();
      } catch (const std::exception&) {
        // They find out by themselves.
      }
    }
    throw StopRequested(signal, fmt::format("rank {} of {}: stopped by {} while waiting in a collective: {}; the "
                                            "ranks cannot agree on a step to stop at, so this rank stops alone",
                                            layout.rank, layout.world_size, strsignal(signal), why));
  }
}

// Ends the watchdog. False when it does not end: a store call that never
// returns (the store's host is stopped, not dead, and c10d's TCPStore waits
// on it without a timeout). The thread is then left to itself, and the Impl
// it uses with it (~Communicator).
bool Communicator::Impl::stop_watch() {
  std::unique_lock<std::mutex> lock(mutex);
  stopping = true;
  wake.notify_all();
  if (!thread.joinable()) return !abandoned;
  // A rank that gave up on a collective (wait_for) may have a watchdog stuck
  // in a call to the same hung store: it is not waited for.
  const auto limit = abandoned ? std::chrono::milliseconds(0) : options.timeout + 2 * interval;
  if (!wake.wait_for(lock, limit, [&] { return watch_ended; })) {
    abandoned = true;
    thread.detach();
    return false;
  }
  lock.unlock();
  thread.join();
  return true;
}

// With `mutex` held: who is lost when the store has not answered the
// watchdog for the timeout, else "".
std::string Communicator::Impl::unanswered_store(std::chrono::milliseconds limit, Clock::time_point watched) const {
  const auto silent = Clock::now() - std::max(answered, watched);
  if (silent <= limit) return "";
  const std::string held = options.rendezvous == "env" || options.rendezvous.rfind("tcp://", 0) == 0
                               ? fmt::format("lost {}, which holds the rendezvous store", describe(0))
                               : fmt::format("lost the rendezvous store {}", options.rendezvous);
  // The time since its last answer, which the watchdog's beats make longer
  // than the limit (the figure the message gave before, however long).
  const double silent_s = seconds(std::chrono::duration_cast<std::chrono::milliseconds>(silent));
  if (limit < options.timeout) {
    return fmt::format("{}: it has not answered for {:.0f} s, while a stop signal waited for it", held, silent_s);
  }
  return fmt::format("{}: it has not answered for {:.0f} s ({} = {})", held, silent_s, options.timeout_where,
                     seconds(options.timeout));
}

void Communicator::Impl::lost(const std::string& what) {
  if (layout.world_size == 1) {
    // A group of one (CommOptions::group_of_one): no other rank to wait for.
    throw RankLost(fmt::format("rank 0 of 1: a collective failed: {}", first_line(what)));
  }
  std::unique_lock<std::mutex> lock(mutex);
  // The lost rank's heartbeat goes stale within the timeout; a few beats more
  // for the watchdog to see it. A stop signal ends the wait: the collective
  // failed already, and the launcher that sent it kills what does not stop.
  // So does a store that has not answered the watchdog for the timeout (its
  // host, rank 0, hangs, and the watchdog with it in a call that never
  // returns), once the watchdog has had two beats to look: after a pause of
  // this process (Slurm's suspend) its last answer is old until it looks.
  const auto entered = Clock::now();
  const auto deadline = entered + options.timeout + 4 * interval;
  const auto store_silent = [&] {
    return Clock::now() - entered > 2 * interval && !unanswered_store(options.timeout).empty();
  };
  while (verdict.empty() && !stopping && stop_requested() == 0 && !store_silent() && Clock::now() < deadline) {
    wake.wait_until(lock, std::min(deadline, Clock::now() + interval),
                    [&] { return !verdict.empty() || stopping; });
  }
  if (verdict.empty()) {
    verdict = unanswered_store(options.timeout);
    // The watchdog is stuck in a call to that store: neither it nor the
    // store is waited for again as this rank ends (leave()).
    if (!verdict.empty()) abandoned = true;
  }
  // A rank asked to stop stops on its signal, whichever rank was lost (it
  // ended with its own status): naming it where known, as a rank that gave
  // up on its collective does (wait_for), whose peers' collectives then fail.
  if (const int signal = stop_requested()) {
    throw StopRequested(signal, verdict.empty()
                                    ? fmt::format("rank {}: stopped by {}: a collective failed ({}) before the rank "
                                                  "at fault was known; this rank stops",
                                                  layout.rank, strsignal(signal), first_line(what))
                                    : fmt::format("rank {}: stopped by {}: {}; this rank stops too (the collective "
                                                  "failed with: {})",
                                                  layout.rank, strsignal(signal), verdict, first_line(what)));
  }
  const std::string who =
      verdict.empty() ? fmt::format("a collective failed and no rank stopped its heartbeat within {} s",
                                    seconds(options.timeout))
                      : verdict;
  throw RankLost(fmt::format("rank {}: {}; this rank stops too (the collective failed with: {})", layout.rank, who,
                             first_line(what)));
}

namespace {

// c10d logs a warning with a C++ backtrace whenever a call to a store or a
// peer fails; on many ranks that is how a lost rank shows itself, and this
// engine names the rank and stops in a message of its own. So c10's log
// shows errors only, unless the user chose a level (TORCH_CPP_LOG_LEVEL).
void quiet_c10_warnings() {
  if (std::getenv("TORCH_CPP_LOG_LEVEL") != nullptr) return;
  constexpr int kErrorsOnly = 2;  // c10's levels: INFO 0, WARNING 1, ERROR 2
  FLAGS_caffe2_log_level = std::max(FLAGS_caffe2_log_level, kErrorsOnly);
  c10::UpdateLoggingLevelsFromFlags();
}

}  // namespace

Communicator::Communicator(const RankLayout& layout, const CommOptions& options)
    : impl_(std::make_unique<Impl>()) {
  impl_->layout = layout;
  impl_->options = options;
  if (layout.world_size == 1 && !options.group_of_one) {
    // Unused on one rank, but a setting that would fail on many is refused
    // here too: the run file is tried on one rank before it goes to a cluster.
    impl_->find_store(/*read_environment=*/false);
    impl_->layout.local_rank = 0;
    impl_->layout.local_size = 1;
    impl_->hosts = {hostname()};
    impl_->world = std::make_unique<ProcessGroupGroup>(*impl_, nullptr, 0, 1);
    impl_->node = std::make_unique<ProcessGroupGroup>(*impl_, nullptr, 0, 1);
    return;
  }
  quiet_c10_warnings();
  impl_->interval = std::clamp(options.timeout / 10, std::chrono::milliseconds(100), std::chrono::milliseconds(5000));
  try {
    impl_->meet();
  } catch (const std::exception&) {
    // A thread left stuck in a store call keeps the Impl.
    if (impl_->abandoned) (void)impl_.release();
    throw;
  }
  impl_->thread = std::thread([impl = impl_.get()] { impl->watch(); });
  try {
    impl_->place();
  } catch (const std::exception&) {
    leave();
    throw;
  }
}

Communicator::~Communicator() { leave(); }

void Communicator::leave() noexcept {
  if (!impl_) return;
  if (!impl_->stop_watch() || impl_->abandoned) {
    // The watchdog, or a group's set-up, is stuck in a call to a store or a
    // peer that stopped answering: the Impl stays with it, and this rank
    // does not call the store either.
    (void)impl_.release();
    return;
  }
  // Unwinding from an error: tell the others at once rather than after the
  // timeout.
  if (impl_->store && !impl_->finishing) {
    try {
      impl_->store->set(heartbeat_key(rank()), bytes_of(kFailed));
      impl_->let_the_others_read_the_verdict();
    } catch (const std::exception&) {
      // The store's host is gone too; the others find out by themselves.
    }
  }
  impl_.reset();
}

// Rank 0 holds the store (env and tcp rendezvous), and once it goes the
// others can read nothing there: a rank that had not yet read which rank
// rank 0 found lost then named rank 0, the store's host, instead. Having
// named one, rank 0 gives the ranks still running two watchdog intervals to
// read the verdict (each counts itself in kLostReadKey) before it goes.
void Communicator::Impl::let_the_others_read_the_verdict() {
  if (layout.rank != 0 || lost_rank < 0 || store_path.size() > 0) return;
  std::vector<std::string> keys;
  for (int r = 1; r < layout.world_size; ++r) keys.push_back(heartbeat_key(r));
  const auto beats = store->multiGet(keys);
  std::int64_t readers = 0;
  for (int r = 1; r < layout.world_size; ++r) {
    const std::string beat = text_of(beats[static_cast<std::size_t>(r - 1)]);
    readers += r != lost_rank && beat != kFailed && beat != kDone;
  }
  const auto deadline = Clock::now() + 2 * interval;
  while (store->add(kLostReadKey, 0) < readers && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

int Communicator::rank() const { return impl_->layout.rank; }
int Communicator::size() const { return impl_->layout.world_size; }
int Communicator::local_rank() const { return impl_->layout.local_rank; }
int Communicator::local_size() const { return impl_->layout.local_size; }
int Communicator::nodes() const { return impl_->nodes; }
int Communicator::max_local_size() const { return impl_->max_local_size; }
std::string Communicator::host(int rank) const { return impl_->hosts.at(static_cast<std::size_t>(rank)); }
Group& Communicator::world() { return *impl_->world; }
Group& Communicator::node() { return *impl_->node; }

std::string Communicator::backend(c10::DeviceType device) const {
  c10d::ProcessGroup* pg = impl_->world->process_group();
  return pg ? pg->getBackend(device)->getBackendName() : "";
}

Group& Communicator::consecutive(int n) {
  auto& slot = impl_->consecutive[n];
  if (!slot) {
    if (n < 1 || size() % n != 0) {
      throw Error(fmt::format("a group of {} consecutive ranks does not divide the {} ranks", n, size()));
    }
    const int first = rank() - rank() % n;
    std::vector<int> members;
    for (int r = first; r < first + n; ++r) members.push_back(r);
    slot = impl_->group(fmt::format("consecutive{}-{}", n, first), members);
  }
  return *slot;
}

namespace {

class WorkPending final : public Communicator::Pending {
 public:
  WorkPending(ProcessGroupGroup& group, c10::intrusive_ptr<c10d::Work> work, bool on_cuda)
      : group_(group), work_(std::move(work)), on_cuda_(on_cuda) {}
  void wait() override {
    if (work_) group_.run([&] { group_.wait(work_, on_cuda_); });
    work_.reset();
  }

 private:
  ProcessGroupGroup& group_;
  c10::intrusive_ptr<c10d::Work> work_;
  bool on_cuda_;
};

}  // namespace

std::unique_ptr<Communicator::Pending> Communicator::all_reduce_sum_async(at::Tensor& flat) {
  ProcessGroupGroup& w = *impl_->world;
  c10::intrusive_ptr<c10d::Work> work;
  if (w.process_group()) {
    std::vector<at::Tensor> tensors{flat};
    w.run([&] { work = w.process_group()->allreduce(tensors); });
  }
  return std::make_unique<WorkPending>(w, std::move(work), flat.is_cuda());
}

void Communicator::broadcast_from_rank0(const std::vector<at::Tensor>& tensors) {
  ProcessGroupGroup& w = *impl_->world;
  if (!w.process_group()) return;
  // One flat buffer per dtype and device.
  std::map<std::pair<at::ScalarType, std::string>, std::vector<at::Tensor>> kinds;
  for (const at::Tensor& t : tensors) kinds[{t.scalar_type(), t.device().str()}].push_back(t);
  for (auto& [kind, list] : kinds) {
    std::vector<at::Tensor> flat_parts;
    for (const at::Tensor& t : list) flat_parts.push_back(t.detach().reshape({-1}));
    std::vector<at::Tensor> flat{at::cat(flat_parts)};
    c10d::BroadcastOptions o;
    o.rootRank = 0;
    w.run([&] { w.wait(w.process_group()->broadcast(flat, o), flat[0].is_cuda()); });
    std::int64_t offset = 0;
    for (const at::Tensor& t : list) {
      at::NoGradGuard no_grad;
      const std::int64_t n = t.numel();
      t.detach().copy_(flat[0].narrow(0, offset, n).view(t.sizes()));
      offset += n;
    }
  }
}

void Communicator::finish() {
  if (!impl_->world->process_group()) return;
  impl_->world->barrier();
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->finishing = true;
  }
  try {
    impl_->store->set(heartbeat_key(rank()), bytes_of(kDone));
  } catch (const std::exception&) {
    // Rank 0 may have gone already: every rank passed the barrier.
  }
  impl_->stop_watch();
}

}  // namespace deepcam
