#include "synth.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <system_error>

#include <fmt/format.h>

#include "deepcam/data_set.hpp"
#include "deepcam/error.hpp"
#include "deepcam/h5.hpp"
#include "parallel.hpp"
#include "stats.hpp"
#include "std_streams.hpp"
#include "temporary_files.hpp"

namespace deepcam::data {
namespace fs = std::filesystem;

namespace {

constexpr int kChannels = 16;
constexpr double kPi = 3.14159265358979323846;
enum Channel { TMQ, U850, V850, UBOT, VBOT, QREFHT, PS, PSL, T200, T500, PRECT, TS, TREFHT, Z1000, Z200, ZBOT };
static_assert(ZBOT + 1 == kChannels);

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Uniform variates made from the engine's raw output: the standard fixes
// mt19937_64's sequence but not what the <random> distributions do with it,
// and the same seed must give the same files with any standard library.
class Random {
 public:
  explicit Random(std::uint64_t seed) : engine_(seed) {}
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  bool chance(double p) { return uniform() < p; }
  double sign() { return chance(0.5) ? 1.0 : -1.0; }

 private:
  std::mt19937_64 engine_;
};

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Smooth large-scale variability with zero mean and about unit variance: a
// sum of a few plane waves of 0.5 to 4 cycles across the image. A plane wave
// separates into row and column tables (sin(a+b) = sin a cos b + cos a sin b),
// so a pixel costs two multiply-adds per wave.
class NoiseField {
 public:
  static constexpr int kWaves = 4;

  NoiseField(Random& random, int height, int width)
      : sx_(kWaves * width), cx_(kWaves * width), sy_(kWaves * height), cy_(kWaves * height) {
    for (int w = 0; w < kWaves; ++w) {
      const double fx = random.uniform(0.5, 4.0) * random.sign(), fy = random.uniform(0.3, 3.0);
      const double px = random.uniform(0.0, 2 * kPi), py = random.uniform(0.0, 2 * kPi);
      const double amplitude = 0.7;
      for (int j = 0; j < width; ++j) {
        const double a = 2 * kPi * fx * (j + 0.5) / width + px;
        sx_[w * width + j] = static_cast<float>(amplitude * std::sin(a));
        cx_[w * width + j] = static_cast<float>(amplitude * std::cos(a));
      }
      for (int i = 0; i < height; ++i) {
        const double b = 2 * kPi * fy * (i + 0.5) / height + py;
        sy_[w * height + i] = static_cast<float>(std::sin(b));
        cy_[w * height + i] = static_cast<float>(std::cos(b));
      }
    }
    width_ = width;
    height_ = height;
  }

  float at(int i, int j) const {
    float v = 0.f;
    for (int w = 0; w < kWaves; ++w)
      v += sx_[w * width_ + j] * cy_[w * height_ + i] + cx_[w * width_ + j] * sy_[w * height_ + i];
    return v;
  }

 private:
  std::vector<float> sx_, cx_, sy_, cy_;
  int width_ = 0, height_ = 0;
};

// Coordinates are in units of the image height: x in [0, width/height),
// y in [0, 1) from the north pole down, so distances are isotropic.
struct River {
  double xm, half_length, y0, slope, meander, wavelength, phase, radius, edge;
  double tmq, wind, prect, psl;

  double centre(double x) const {
    return y0 + slope * (x - xm) + meander * std::sin(2 * kPi * (x - xm) / wavelength + phase);
  }
  double centre_slope(double x) const {
    return slope + meander * 2 * kPi / wavelength * std::cos(2 * kPi * (x - xm) / wavelength + phase);
  }
};

// A river's per-column geometry: centre line, half-width (tapered towards
// the ends) and the factor that turns a vertical offset into a distance.
struct RiverColumns {
  int j0 = 0, j1 = -1;
  std::vector<float> y, half_width, perpendicular, east, north;
};

struct Cyclone {
  double x, y, radius, depth, vmax, tmq, spin;
};

River make_river(Random& r) {
  River river{};
  const double hemisphere = r.sign();  // +1 north
  const double lat = r.uniform(22.0, 52.0) * hemisphere;
  river.y0 = (90.0 - lat) / 180.0;
  river.half_length = r.uniform(0.3, 0.55);
  river.xm = 0;  // set by the caller, which knows the aspect ratio
  // Rivers run poleward towards the east: y falls with x in the north.
  river.slope = -hemisphere * r.uniform(0.1, 0.45);
  river.meander = r.uniform(0.01, 0.04);
  river.wavelength = r.uniform(0.5, 1.0);
  river.phase = r.uniform(0.0, 2 * kPi);
  river.radius = r.uniform(0.028, 0.042);
  river.edge = 0.1 * river.radius;
  river.tmq = r.uniform(22.0, 30.0);
  river.wind = r.uniform(8.0, 14.0);
  river.prect = r.uniform(1.5e-7, 3e-7);
  river.psl = r.uniform(400.0, 800.0);
  return river;
}

RiverColumns river_columns(const River& river, int height, int width) {
  RiverColumns c;
  const double h = height;
  c.j0 = std::max(0, static_cast<int>(std::floor((river.xm - river.half_length) * h)));
  c.j1 = std::min(width - 1, static_cast<int>(std::ceil((river.xm + river.half_length) * h)));
  const int n = std::max(0, c.j1 - c.j0 + 1);
  c.y.resize(n);
  c.half_width.resize(n);
  c.perpendicular.resize(n);
  c.east.resize(n);
  c.north.resize(n);
  for (int k = 0; k < n; ++k) {
    const double x = (c.j0 + k + 0.5) / h;
    const double t = (x - river.xm) / river.half_length;
    const double t4 = t * t * t * t;
    const double slope = river.centre_slope(x);
    const double norm = 1.0 / std::sqrt(1.0 + slope * slope);
    c.y[k] = static_cast<float>(river.centre(x));
    c.half_width[k] = t4 < 1.0 ? static_cast<float>(river.radius * std::sqrt(1.0 - t4)) : 0.f;
    c.perpendicular[k] = static_cast<float>(norm);
    c.east[k] = static_cast<float>(norm);
    c.north[k] = static_cast<float>(-slope * norm);  // y points south
  }
  return c;
}

double distance_to_river(const River& river, double x, double y) {
  double best = 1e9;
  for (int k = 0; k <= 64; ++k) {
    const double px = river.xm - river.half_length + 2 * river.half_length * k / 64.0;
    best = std::min(best, std::hypot(px - x, river.centre(px) - y));
  }
  return best;
}

// The events of one sample: 1 to 3 rivers; a cyclone in about half the
// samples (a second one in some), kept clear of the rivers and of each other
// so that their labels do not overlap.
void make_events(Random& r, double aspect, std::vector<River>& rivers, std::vector<Cyclone>& cyclones) {
  const int n_rivers = 1 + static_cast<int>(r.uniform() * 3.0);
  for (int k = 0; k < n_rivers; ++k) {
    River river = make_river(r);
    river.xm = r.uniform(0.15, aspect - 0.15);
    rivers.push_back(river);
  }
  int n_cyclones = 0;
  if (r.chance(0.55)) n_cyclones = r.chance(0.3) ? 2 : 1;
  for (int k = 0; k < n_cyclones; ++k) {
    for (int attempt = 0; attempt < 40; ++attempt) {
      Cyclone c{};
      c.spin = r.sign();  // +1 north: counter-clockwise
      const double lat = c.spin * r.uniform(8.0, 30.0);
      c.y = (90.0 - lat) / 180.0;
      c.x = r.uniform(0.1, aspect - 0.1);
      c.radius = r.uniform(0.055, 0.085);
      c.depth = r.uniform(3000.0, 6000.0);
      c.vmax = r.uniform(25.0, 50.0);
      c.tmq = r.uniform(22.0, 32.0);
      bool clear = true;
      for (const River& river : rivers)
        clear = clear && distance_to_river(river, c.x, c.y) > c.radius + river.radius + 0.03;
      for (const Cyclone& other : cyclones)
        clear = clear && std::hypot(other.x - c.x, other.y - c.y) > c.radius + other.radius + 0.05;
      if (clear) {
        cyclones.push_back(c);
        break;
      }
    }
  }
}

}  // namespace

void generate_sample(std::uint64_t seed, Split split, std::uint64_t index, int height, int width,
                     Sample& sample) {
  Random r(splitmix64(splitmix64(splitmix64(seed) ^ static_cast<std::uint64_t>(split)) ^ index));
  sample.height = height;
  sample.width = width;
  sample.data.resize(static_cast<std::size_t>(height) * width * kChannels);
  sample.labels.resize(static_cast<std::size_t>(height) * width);

  const double h = height, aspect = static_cast<double>(width) / height;
  const NoiseField n0(r, height, width), n1(r, height, width), n2(r, height, width), n3(r, height, width);
  std::vector<River> rivers;
  std::vector<Cyclone> cyclones;
  make_events(r, aspect, rivers, cyclones);
  std::vector<RiverColumns> columns;
  for (const River& river : rivers) columns.push_back(river_columns(river, height, width));

  for (int i = 0; i < height; ++i) {
    const double y = (i + 0.5) / h;
    const double lat = (90.0 - 180.0 * y) * kPi / 180.0;
    const double c = std::cos(lat), c2 = c * c, s2 = 1.0 - c2;
    // Lows at the equator and 60 degrees, highs in the subtropics and at the poles.
    const double psl_zonal = 101100.0 - 800.0 * std::cos(6.0 * lat);
    const double u_zonal = -5.0 + 17.0 * std::pow(std::sin(2.0 * lat), 2);
    for (int j = 0; j < width; ++j) {
      const double x = (j + 0.5) / h;
      const double a = n0.at(i, j), b = n1.at(i, j), d = n2.at(i, j), e = n3.at(i, j);
      double tmq = 4.0 + 42.0 * c2 + 5.0 * a;
      double u = u_zonal + 4.0 * b, v = 3.0 * d;
      double psl = psl_zonal + 600.0 * e;
      double prect = (1e-8 + 4e-8 * c2 * c2) * (1.0 + 0.5 * std::tanh(a));
      double warm_core = 0.0;
      std::int32_t label = 0;

      for (std::size_t k = 0; k < rivers.size(); ++k) {
        const RiverColumns& rc = columns[k];
        if (j < rc.j0 || j > rc.j1) continue;
        const int q = j - rc.j0;
        const double half_width = rc.half_width[q];
        if (half_width <= 0.0) continue;
        const double dist = std::fabs(y - rc.y[q]) * rc.perpendicular[q];
        const River& river = rivers[k];
        if (dist > half_width + 8.0 * river.edge) continue;
        const double f = sigmoid((half_width - dist) / river.edge);
        const double core = 1.0 - std::min(1.0, dist / river.radius);
        tmq += river.tmq * f * (0.8 + 0.2 * core);
        u += river.wind * f * rc.east[q];
        v += river.wind * f * rc.north[q];
        prect += river.prect * f;
        psl -= river.psl * f;
        if (dist < half_width) label = 2;
      }
      for (const Cyclone& cy : cyclones) {
        const double dx = x - cy.x, dy = y - cy.y;
        if (std::fabs(dx) > 3.0 * cy.radius || std::fabs(dy) > 3.0 * cy.radius) continue;
        const double dist = std::hypot(dx, dy), rho = dist / cy.radius;
        const double f = sigmoid((1.0 - rho) / 0.08), g = std::exp(-rho * rho);
        psl -= cy.depth * (0.6 * f + 0.4 * g);
        tmq += cy.tmq * f + 8.0 * g;
        prect += 6e-7 * f * (1.0 - 0.5 * std::min(rho, 1.0)) + 1e-7 * g;
        warm_core += f;
        if (dist > 0.0) {
          const double vt = cy.vmax * (rho < 0.35 ? rho / 0.35 : std::pow(0.35 / rho, 0.7)) *
                            std::exp(-std::pow(rho / 2.0, 4));
          const double east = dx / dist, north = -dy / dist;
          u += -cy.spin * vt * north;
          v += cy.spin * vt * east;
        }
        if (rho < 1.0) label = 1;
      }

      // Keep TMQ within what CAM5 produces without flattening the contrast.
      if (tmq > 60.0) tmq = 60.0 + 15.0 * std::tanh((tmq - 60.0) / 15.0);
      tmq = std::max(tmq, 0.3);
      const double topography = 150.0 * (1.0 + std::tanh(b));
      const double ts = 230.0 + 70.0 * c2 + 3.0 * d;

      float* px = sample.data.data() + (static_cast<std::size_t>(i) * width + j) * kChannels;
      px[TMQ] = static_cast<float>(tmq);
      px[U850] = static_cast<float>(u);
      px[V850] = static_cast<float>(v);
      px[UBOT] = static_cast<float>(0.7 * u + 1.0 * e);
      px[VBOT] = static_cast<float>(0.7 * v + 1.0 * a);
      px[QREFHT] = static_cast<float>(std::max(2e-5, 0.0005 + 0.00033 * tmq + 0.0006 * d));
      px[PS] = static_cast<float>(psl - 11.8 * topography);
      px[PSL] = static_cast<float>(psl);
      px[T200] = static_cast<float>(212.0 + 10.0 * s2 + 2.0 * a);
      px[T500] = static_cast<float>(245.0 + 22.0 * c2 + 2.5 * b + 5.0 * warm_core);
      px[PRECT] = static_cast<float>(std::max(0.0, prect));
      px[TS] = static_cast<float>(ts);
      px[TREFHT] = static_cast<float>(ts - 1.5 + 1.0 * e);
      px[Z1000] = static_cast<float>((psl - 100000.0) / 11.8);
      px[Z200] = static_cast<float>(11000.0 + 1400.0 * c2 + 100.0 * d + 60.0 * warm_core);
      px[ZBOT] = static_cast<float>(62.0 + 3.0 * e);
      sample.labels[static_cast<std::size_t>(i) * width + j] = label;
    }
  }
}

std::string sample_file_name(std::uint64_t step) {
  static constexpr int kMonthDays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  const std::uint64_t hours = 3 * step, days = hours / 24;
  const std::uint64_t year = 2106 + days / 365;
  int day_of_year = static_cast<int>(days % 365), month = 0;
  while (day_of_year >= kMonthDays[month]) day_of_year -= kMonthDays[month++];
  return fmt::format("data-{:04d}-{:02d}-{:02d}-{:02d}-1.h5", year, month + 1, day_of_year + 1, hours % 24);
}

namespace {

struct Job {
  Split split;
  std::uint64_t index;
  fs::path path;
};

const char* split_name(Split split) {
  switch (split) {
    case Split::train: return "train";
    case Split::validation: return "validation";
    case Split::test: return "test";
  }
  return "?";
}

void make_directory(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(fmt::format("{}: cannot create the directory: {}", dir.string(), ec.message()));
  if (!fs::is_directory(dir, ec)) throw Error(fmt::format("{}: exists and is not a directory", dir.string()));
}

// The names in `dir`, sorted (a message names the same one each time);
// the temporaries of writers, which synth removes or leaves to their live
// writer, left out.
std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (!temporary_files::writer(name)) names.push_back(std::move(name));
  }
  if (ec) throw Error(fmt::format("{}: cannot list the directory: {}", dir.string(), ec.message()));
  std::sort(names.begin(), names.end());
  return names;
}

// --out is empty or holds what a stopped run of this same command left:
// split folders of this run holding samples of this run, no stats.h5 (it is
// written last). Anything else would mix into, or be mixed into, another
// data set (stats.h5 covers all of train/; an in-place numpy form would
// hold pairs of other samples), so it is refused before anything is written.
void check_out(const fs::path& out, const std::map<std::string, std::set<std::string>>& ours) {
  std::error_code ec;
  if (!fs::is_directory(out, ec)) return;  // made below, or named by make_directory
  const std::vector<std::string> names = entries(out);
  if (std::find(names.begin(), names.end(), "stats.h5") != names.end())
    throw Error(fmt::format("{}: holds stats.h5: a finished data set; use an empty --out directory (running synth "
                            "again finishes only a run that was stopped, which leaves no stats.h5)",
                            out.string()));
  for (const std::string& name : names) {
    const auto split = ours.find(name);
    if (split == ours.end() || !fs::is_directory(out / name, ec))
      throw Error(fmt::format("{}: holds {}, which this run would not write; use an empty --out directory",
                              out.string(), name));
    for (const std::string& file : entries(out / name))
      if (!split->second.count(file))
        throw Error(fmt::format("{}: holds {}, which this run would not write; use an empty --out directory",
                                (out / name).string(), file));
  }
}

}  // namespace

void run_synth(const SynthOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<Job> jobs;
  std::map<std::string, std::set<std::string>> ours;  // per split folder, its samples
  std::uint64_t step = 0;
  for (auto [split, count] : {std::pair{Split::train, o.train}, std::pair{Split::validation, o.validation},
                              std::pair{Split::test, o.test}}) {
    if (count <= 0) continue;
    std::set<std::string>& names = ours[split_name(split)];
    for (int k = 0; k < count; ++k) {
      const std::string name = sample_file_name(step++);
      names.insert(name);
      jobs.push_back({split, static_cast<std::uint64_t>(k), o.out / split_name(split) / name});
    }
  }
  if (const std::string problem = output_directory_problem(o.out.string()); !problem.empty())
    throw Error(fmt::format("{}: {}; synth writes the data set into the folder --out names", o.out.string(), problem));
  check_out(o.out, ours);
  // The folders this run makes go again, when still empty, if it fails (a
  // sample that does not fit in memory, a full disk, a stop signal): a
  // failed synth leaves what a stopped one of samples leaves, or nothing.
  std::error_code ec;
  std::vector<fs::path> made;  // outermost first
  fs::path prefix;
  // Each folder on the way as written ("i/../j" makes i too), not as
  // lexically_normal would shorten it.
  for (const fs::path& part : fs::absolute(o.out, ec)) {
    prefix /= part;
    if (part.empty() || part == "." || part == "..") continue;
    if (!fs::exists(fs::symlink_status(prefix, ec))) made.push_back(prefix);
  }
  for (const auto& [split, names] : ours)
    if (!fs::exists(fs::symlink_status(o.out / split, ec))) made.push_back(o.out / split);
  struct RemoveEmpty {
    std::vector<fs::path>& made;
    bool done = false;
    ~RemoveEmpty() {
      if (done) return;
      std::error_code ignored;
      for (auto it = made.rbegin(); it != made.rend(); ++it)
        if (fs::is_empty(*it, ignored)) fs::remove(*it, ignored);
    }
  } remove_empty{made};
  for (const auto& [split, names] : ours) {
    make_directory(o.out / split);
    remove_stale_temporaries(o.out / split);
  }

  Progress progress("synth", jobs.size(), "samples", o.progress);
  // One sample buffer per thread, reused; the same files with any number of
  // threads (each sample's random numbers depend on the seed and its index).
  parallel_for_each<Sample>(jobs.size(), o.threads, [&](Sample& sample, std::size_t k) {
    const Job& job = jobs[k];
    generate_sample(o.seed, job.split, job.index, o.height, o.width, sample);
    write_atomically(job.path, [&](h5::File& file) {
      const auto h = static_cast<std::uint64_t>(o.height), w = static_cast<std::uint64_t>(o.width);
      file.write("climate/data", sample.data.data(), {h, w, static_cast<std::uint64_t>(kChannels)});
      file.write("climate/labels_0", sample.labels.data(), {h, w});
    });
    progress.advance();
  });

  // The statistics re-read every training file: progress of their own, no table.
  const ChannelStats stats = run_stats(o.out, o.progress, /*summary=*/false);
  remove_empty.done = true;
  if (o.progress.quiet) return;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  deepcam::eprint(
      "deepcam-data: wrote {} train, {} validation, {} test samples ({}x{}, seed {}) and stats.h5 "
      "({} pixels per channel) to {} in {:.1f} s\n",
      o.train, o.validation, o.test, o.height, o.width, o.seed, stats.count, o.out.string(), seconds);
}

}  // namespace deepcam::data
