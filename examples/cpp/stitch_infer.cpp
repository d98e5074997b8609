// stitch_infer: classify a batch of images with the config of a stitch-compile bundle that fits a
// latency budget, from C++ and without Python, through the bundle's AOTInductor CPU packages.
//
//   stitch_infer BUNDLE_DIR --budget-ms MS --input INPUT.npy [--batch-lut N] [--metric p50|p90|p99]
//                [--lut DEVICE_KEY] [--build BUILD_KEY] [--threads N] [--output LOGITS.txt]
//
// run() does, in order:
//   1. read_manifest: the configs, and the aoti build with device "cpu" (or --build);
//   2. read_lut, select_config: this machine's latency table (lut/<device key>.json) and the config
//      the Python runtime would choose for the budget (stitch_compile/runtime/select.py);
//   3. read_npy: the images, float32 [batch, C, H, W];
//   4. load_segment: one AOTIModelPackageLoader per segment of the config's route, its constants
//      (weights) views of the memory-mapped weight files, handed over without a copy;
//   5. run_chain: segment_n(...segment_1(images)) = the logits.
//
// Any problem with the input or the bundle is one "error: ..." line on stderr and exit code 2. The
// checks keep a damaged bundle from sending the program outside its files (paths, byte ranges,
// shapes); they do not prove the bundle genuine. Loading a package runs its native code, so run
// `stitch-compile verify BUNDLE` (sha256 of every file) before deploying a bundle you did not build.
//
// The code is C++17; CMakeLists.txt compiles it as C++20 because the libtorch 2.14 headers need it.

#include "json.hpp"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace fs = std::filesystem;
using sjson::Value;

namespace {

// ---------------------------------------------------------------------------------------------
// errors, files, JSON

// Problems caused by input: main() prints them as one line and exits with code 2.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void fail(const std::string& msg) { throw Error(msg); }

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

std::string shape_str(at::IntArrayRef shape) {
  std::vector<std::string> dims;
  for (int64_t d : shape) dims.push_back(std::to_string(d));
  return "[" + join(dims) + "]";
}

// The element count of a shape; fails on overflow, which only a damaged file can cause.
uint64_t numel(at::IntArrayRef shape, const std::string& what) {
  uint64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n))
      fail(what + ": shape " + shape_str(shape) + " is too large");
  return n;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream data;
  if (!(f && data << f.rdbuf())) fail(path + ": cannot read");
  return data.str();
}

Value parse_json(const std::string& path, const std::string& what) {
  try {
    return sjson::parse(read_file(path));
  } catch (const sjson::ParseError& e) {
    fail(path + ": corrupt " + what + " (" + e.what() + ")");
  }
}

// A JSON value and where it is, so that every complaint names its file and key.
struct J {
  const Value& v;
  std::string file, key;

  [[noreturn]] void bad(const std::string& why) const {
    fail(file + ": invalid " + (key.empty() ? "document" : "'" + key + "'") + ": " + why);
  }
  J child(const Value& c, const std::string& k) const { return {c, file, key.empty() ? k : key + "/" + k}; }
  bool has(const std::string& k) const { return v.find(k) && !v.find(k)->is_null(); }
  J operator[](const std::string& k) const {
    if (!v.is_object()) bad("expected an object");
    if (!v.find(k)) bad("missing '" + k + "'");
    return child(*v.find(k), k);
  }
  J operator[](size_t i) const { return child(v.items().at(i), std::to_string(i)); }
  const std::vector<std::string>& keys() const {
    if (!v.is_object()) bad("expected an object");
    return v.keys();
  }
  size_t array_size() const {
    if (!v.is_array()) bad("expected an array");
    return v.size();
  }
  const std::string& str() const {
    if (!v.is_string()) bad("expected a string");
    return v.as_string();
  }
  int64_t integer(int64_t min) const {
    if (!v.is_integer() || v.as_int() < min) bad("expected an integer >= " + std::to_string(min));
    return v.as_int();
  }
  double number() const {
    if (!v.is_number()) bad("expected a number");
    return v.as_number();
  }
  double positive() const {
    double x = number();
    if (!(x > 0) || !std::isfinite(x)) bad("expected a finite positive number");
    return x;
  }
  bool boolean() const {
    if (!v.is_bool()) bad("expected true or false");
    return v.as_bool();
  }
};

// root/rel, where rel comes from the manifest: it must be relative and must not leave the bundle,
// neither with ".." nor through a symbolic link.
std::string inside(const fs::path& root, const std::string& rel) {
  if (rel.empty() || rel[0] == '/')
    fail(root.string() + ": manifest path '" + rel + "' is not a relative bundle path; the bundle is tampered");
  std::error_code ec;
  const std::string path = fs::weakly_canonical(root / rel, ec).string();  // resolves links and ".."
  if (ec || path.compare(0, root.string().size() + 1, root.string() + "/") != 0)
    fail(root.string() + ": manifest path '" + rel + "' leaves the bundle; the bundle is tampered");
  if (!fs::is_regular_file(path))
    fail(root.string() + ": missing file " + rel + "; the bundle is incomplete, re-export it");
  return path;
}

// ---------------------------------------------------------------------------------------------
// command line

struct Options {
  std::string bundle, input, output, lut, build, metric = "p50";
  double budget_ms = 0;
  int64_t batch_lut = 1;
  int64_t threads = 0;  // 0: the thread count the latency table was measured with
};

const char* kUsage =
    "usage: stitch_infer BUNDLE_DIR --budget-ms MS --input INPUT.npy [--batch-lut N] [--metric p50|p90|p99]\n"
    "                    [--lut DEVICE_KEY] [--build BUILD_KEY] [--threads N] [--output LOGITS.txt]\n"
    "Classifies INPUT.npy (float32 [batch, C, H, W]) with the best config whose latency in this\n"
    "machine's latency table fits the budget; see examples/cpp/README.md.\n";

double parse_positive(const std::string& flag, const std::string& text, bool integer) {
  double x = 0;
  auto r = std::from_chars(text.data(), text.data() + text.size(), x);
  if (r.ec != std::errc() || r.ptr != text.data() + text.size() || !(x > 0) || !std::isfinite(x) ||
      (integer && x != std::floor(x)))
    fail(flag + " '" + text + "': expected a positive " + (integer ? "integer" : "number"));
  return x;
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) fail("option " + arg + " needs a value");
      return std::string(argv[++i]);
    };
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (arg[0] != '-') {
      if (!o.bundle.empty()) fail("expected one BUNDLE_DIR, got '" + o.bundle + "' and '" + arg + "'");
      o.bundle = arg;
    } else if (arg == "--budget-ms") {
      o.budget_ms = parse_positive(arg, value(), false);
    } else if (arg == "--batch-lut") {
      o.batch_lut = static_cast<int64_t>(parse_positive(arg, value(), true));
    } else if (arg == "--threads") {
      o.threads = static_cast<int64_t>(parse_positive(arg, value(), true));
    } else if (arg == "--metric") {
      o.metric = value();
      if (o.metric != "p50" && o.metric != "p90" && o.metric != "p99")
        fail("unknown latency metric '" + o.metric + "'; choose from p50, p90, p99");
    } else if (arg == "--input") {
      o.input = value();
    } else if (arg == "--output") {
      o.output = value();
    } else if (arg == "--lut") {
      o.lut = value();
    } else if (arg == "--build") {
      o.build = value();
    } else {
      fail("unknown option '" + arg + "'; see --help");
    }
  }
  if (o.bundle.empty()) fail("missing BUNDLE_DIR; see --help");
  if (o.budget_ms == 0) fail("missing --budget-ms MS");
  if (o.input.empty()) fail("missing --input INPUT.npy");
  return o;
}

// ---------------------------------------------------------------------------------------------
// manifest

struct Config {
  int64_t id = 0;
  std::vector<std::string> route;  // segment keys, in order
  int64_t flops = 0;
  std::optional<double> accuracy;
};

struct Build {
  std::string key, constants;                  // constants: path of constants.json
  int64_t max_batch = 0;
  std::map<std::string, std::string> weights;  // bundle-relative name -> path
  std::map<std::string, std::string> package;  // segment key -> path of its .pt2
};

struct Manifest {
  std::string source_sha256;  // of the checkpoint the bundle was exported from
  std::vector<int64_t> input_chw;
  std::map<int64_t, Config> configs;
  std::map<std::string, std::vector<int64_t>> in_shape;  // segment key -> input shape, batch excluded
  Build build;
};

Manifest read_manifest(const fs::path& root, const std::string& build_key) {
  const std::string path = (root / "manifest.json").string();
  if (!fs::is_regular_file(path))
    fail(root.string() + ": not a bundle (no manifest.json); create one with 'stitch-compile export'");
  const Value doc = parse_json(path, "manifest");
  const J top{doc, path, ""};
  if (top.has("schema_version") && top["schema_version"].integer(0) != 1)
    fail(path + ": schema_version is not 1, the version this program reads; re-export the bundle");
  Manifest m;
  if (top.has("source") && top["source"].has("sha256")) m.source_sha256 = top["source"]["sha256"].str();

  J shape = top["input"]["shape"];
  if (shape.array_size() != 4) shape.bad("expected [\"batch\", C, H, W]");
  for (size_t i = 1; i < 4; ++i) m.input_chw.push_back(shape[i].integer(1));

  J configs = top["configs"];
  for (size_t i = 0; i < configs.array_size(); ++i) {
    J c = configs[i], route = c["route"];
    Config cfg;
    cfg.id = c["id"].integer(0);
    cfg.flops = c["flops"].integer(0);
    for (size_t j = 0; j < route.array_size(); ++j) cfg.route.push_back(route[j].str());
    if (cfg.route.empty()) route.bad("expected at least one segment");
    if (c.has("accuracy")) cfg.accuracy = c["accuracy"].number();
    if (!m.configs.emplace(cfg.id, cfg).second) c["id"].bad("config id appears twice");
  }
  J segments = top["segments"];
  for (const auto& key : segments.keys()) {
    J in = segments[key]["in_shape"];
    for (size_t i = 0; i < in.array_size(); ++i) m.in_shape[key].push_back(in[i].integer(1));
  }
  for (const auto& [id, cfg] : m.configs)
    for (const auto& seg : cfg.route)
      if (!m.in_shape.count(seg))
        fail(path + ": config " + std::to_string(id) + " names unknown segment '" + seg + "'");

  // the build: the only one for the CPU, unless --build names one
  const std::string export_hint =
      "run 'stitch-compile export CHECKPOINT --out " + root.string() + " --targets aoti --device cpu' to add one";
  if (!top["targets"].has("aoti")) fail(root.string() + ": no AOTInductor target in this bundle; " + export_hint);
  J builds = top["targets"]["aoti"]["builds"];
  std::vector<std::string> cpu;
  for (const auto& key : builds.keys())
    if (builds[key]["device"].str() == "cpu") cpu.push_back(key);
  std::string key = build_key;
  if (key.empty() && cpu.size() > 1)
    fail(root.string() + ": several AOTInductor CPU builds (" + join(cpu) + "); choose one with --build");
  if (key.empty() && cpu.size() == 1) key = cpu[0];
  if (std::find(cpu.begin(), cpu.end(), key) == cpu.end())
    fail(root.string() + ": no AOTInductor CPU build" + (key.empty() ? "" : " '" + key + "'") +
         " in this bundle (CPU builds: " + (cpu.empty() ? "none" : join(cpu)) + "); " + export_hint);

  // every path of the build is resolved (and checked) here, before anything is loaded
  J b = builds[key];
  m.build.key = key;
  m.build.max_batch = b.has("max_batch") ? b["max_batch"].integer(1) : INT64_MAX;
  m.build.constants = inside(root, b["constants"].str());
  J weights = b["weights"];
  for (size_t i = 0; i < weights.array_size(); ++i)
    m.build.weights[weights[i].str()] = inside(root, weights[i].str());
  J seg_arch = b["segments"];
  for (const auto& seg : seg_arch.keys()) m.build.package[seg] = inside(root, b["packages"][seg_arch[seg].str()].str());
  return m;
}

// ---------------------------------------------------------------------------------------------
// latency table and selection

struct Lut {
  std::string path, device_key;
  Value doc;
  int64_t threads = 0;  // device.threads: the intra-op threads it was measured with
};

// This machine's table: the only lut/*.json measured with backend "aoti" on "cpu" (and with this
// build when it names one), or lut/<--lut>.json.
Lut read_lut(const fs::path& root, const Manifest& m, const std::string& key) {
  const std::string& build_key = m.build.key;
  const fs::path dir = root / "lut";
  const std::string bench = "run 'stitch-compile bench " + root.string() + " --backend aoti'";
  std::vector<fs::path> files;
  if (!key.empty()) {
    files.push_back(dir / (key + ".json"));
  } else if (fs::is_directory(dir)) {
    for (const auto& entry : fs::directory_iterator(dir))
      if (entry.path().extension() == ".json") files.push_back(entry.path());
  }
  std::vector<Lut> found;
  for (const auto& file : files) {
    if (!fs::is_regular_file(file)) continue;
    Value doc = parse_json(file.string(), "latency table");
    const Value* dev = doc.find("device");
    auto field = [&](const char* name) {
      const Value* v = dev ? dev->find(name) : nullptr;
      return v && v->is_string() ? v->as_string() : std::string();
    };
    const std::string build = field("build");
    if (field("backend") == "aoti" && field("device") == "cpu" && (build.empty() || build == build_key))
      found.push_back({file.string(), file.stem().string(), std::move(doc)});
  }
  if (found.empty())
    fail(root.string() + ": no latency table for AOTInductor on cpu (build " + build_key + "); " + bench +
         " on this machine");
  if (found.size() > 1) {
    std::vector<std::string> names;
    for (const auto& l : found) names.push_back(l.device_key);
    fail(root.string() + ": several AOTInductor CPU latency tables (" + join(names) + "); choose one with --lut");
  }

  // checked as the Python runtime checks it (stitch_compile/runtime/lut.py): the LUT is written
  // after export and is not covered by the manifest's checksums
  Lut& lut = found[0];
  const J top{lut.doc, lut.path, ""};
  const std::string fix = "; re-" + bench;
  if (top["format"].str() != "stitch-compile-lut" || top["version"].integer(0) != 1)
    top.bad("not a version 1 stitch-compile-lut" + fix);
  if (top["device_key"].str() != lut.device_key) top["device_key"].bad("not the file's name, " + lut.device_key + fix);
  if (!m.source_sha256.empty() && top["bundle"]["source_sha256"].str() != m.source_sha256)
    fail(lut.path + ": measured on another export of the checkpoint (source sha256 differs)" + fix);
  if (top["device"].has("threads")) lut.threads = top["device"]["threads"].integer(1);
  return std::move(lut);
}

struct Choice {
  int64_t id;
  double ms;
  bool predicted;
};

// The rule of stitch_compile/runtime/select.py: among the configs whose latency fits the budget, a
// config with a known accuracy outranks one without; then higher accuracy (more FLOPs when neither
// has one). Ties go to the faster config, then the lower id: equal accuracy never looks at FLOPs.
Choice select_config(const Lut& lut, const Manifest& m, const Options& opt) {
  J latency = J{lut.doc, lut.path, ""}["latency"];
  const std::string batch = std::to_string(opt.batch_lut);
  if (!latency.has(batch))
    fail(lut.path + ": no entries for batch " + batch + " (measured: " + join(latency.keys()) +
         "); run bench with --batch " + batch +
         (latency.keys().empty() ? "" : ", or pass --batch-lut " + latency.keys().front()));
  J rows = latency[batch];
  std::vector<Choice> by_latency;
  for (const auto& key : rows.keys()) {
    int64_t id = -1;
    std::from_chars(key.data(), key.data() + key.size(), id);
    if (std::to_string(id) != key || !m.configs.count(id)) rows.bad("config '" + key + "' is not in this bundle");
    J e = rows[key];
    double p50 = e["p50_ms"].positive(), p90 = e["p90_ms"].positive(), p99 = e["p99_ms"].positive();
    if (!(p50 <= p90 && p90 <= p99)) e.bad("expected p50 <= p90 <= p99");
    double ms = opt.metric == "p50" ? p50 : opt.metric == "p90" ? p90 : p99;
    by_latency.push_back({id, ms, e.has("predicted") && e["predicted"].boolean()});
  }
  if (by_latency.empty()) rows.bad("no configs");
  std::sort(by_latency.begin(), by_latency.end(),
            [](const Choice& a, const Choice& b) { return a.ms != b.ms ? a.ms < b.ms : a.id < b.id; });

  auto outranks = [&](const Choice& a, const Choice& b) {
    const Config &x = m.configs.at(a.id), &y = m.configs.at(b.id);
    if (x.accuracy.has_value() != y.accuracy.has_value()) return x.accuracy.has_value();
    if (x.accuracy) return *x.accuracy > *y.accuracy;
    return x.flops > y.flops;
  };
  const Choice* best = nullptr;  // fastest first, so only a strictly better config replaces it
  for (const auto& c : by_latency) {
    if (c.ms > opt.budget_ms) break;
    if (!best || outranks(c, *best)) best = &c;
  }
  if (!best) {
    const Choice& f = by_latency.front();
    char line[512];
    std::snprintf(line, sizeof line,
                  "no config fits %g ms at %s (batch %s) on %s: the fastest is config %lld at %.3f ms%s; raise the "
                  "budget", opt.budget_ms, opt.metric.c_str(), batch.c_str(), lut.device_key.c_str(),
                  static_cast<long long>(f.id), f.ms, f.predicted ? " (predicted)" : "");
    fail(line);
  }
  return *best;
}

// ---------------------------------------------------------------------------------------------
// input: a .npy file of float32 [batch, C, H, W]

at::Tensor read_npy(const std::string& path, const Manifest& m) {
  if (!fs::is_regular_file(path)) fail(path + ": no such input file");
  const std::string data = read_file(path);
  // "\x93NUMPY", major, minor, header length (2 bytes in version 1, 4 in 2 and 3), header dict
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) fail(path + ": not a .npy file");
  const int major = data[6];
  if (major < 1 || major > 3) fail(path + ": .npy format version " + std::to_string(major) + " is not supported");
  auto byte = [&](size_t i) { return static_cast<size_t>(static_cast<unsigned char>(data[i])); };
  const size_t prefix = major == 1 ? 10 : 12;
  const size_t header_len = major == 1 ? byte(8) | byte(9) << 8
                                       : byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24;
  if (data.size() < prefix || header_len > data.size() - prefix) fail(path + ": truncated .npy header");
  const std::string header = data.substr(prefix, header_len);

  // the header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 16, 16), }
  auto field = [&](const char* pattern) {
    std::smatch match;
    if (!std::regex_search(header, match, std::regex(pattern))) fail(path + ": invalid .npy header");
    return match[1].str();
  };
  const std::string descr = field(R"('descr':\s*'([^']*)')");
  if (descr != "<f4") fail(path + ": dtype '" + descr + "': expected little-endian float32 '<f4' (np.float32)");
  if (field(R"('fortran_order':\s*(True|False))") == "True")
    fail(path + ": Fortran-ordered array; save a C-ordered one (np.ascontiguousarray)");
  std::vector<int64_t> shape;
  std::istringstream dims(field(R"('shape':\s*\(([0-9,\s]*)\))"));
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(" ") != std::string::npos) shape.push_back(std::stoll(d));

  const auto& chw = m.input_chw;
  if (shape.size() != 4 || shape[0] < 1 || std::vector<int64_t>(shape.begin() + 1, shape.end()) != chw)
    fail(path + ": input of shape " + shape_str(shape) + ": this bundle takes [batch, " + std::to_string(chw[0]) +
         ", " + std::to_string(chw[1]) + ", " + std::to_string(chw[2]) + "]");
  if (shape[0] > m.build.max_batch)
    fail(path + ": batch " + std::to_string(shape[0]) + " exceeds the build's max_batch " +
         std::to_string(m.build.max_batch));
  const uint64_t bytes = data.size() - prefix - header_len;
  if (bytes % 4 != 0 || bytes / 4 != numel(shape, path))
    fail(path + ": " + std::to_string(bytes) + " bytes of data, not what shape " + shape_str(shape) + " needs");
  at::Tensor images = at::empty(shape, at::kFloat);
  std::memcpy(images.data_ptr<float>(), data.data() + prefix + header_len, bytes);
  return images;
}

// ---------------------------------------------------------------------------------------------
// weights and segments

// The bundle's weight files, each mapped read-only once. Constants are views into these mappings,
// so this object must outlive every loader that uses them (main() declares it first).
class WeightFiles {
 public:
  struct File {
    const uint8_t* data = nullptr;
    uint64_t size = 0;
  };
  WeightFiles() = default;
  WeightFiles(const WeightFiles&) = delete;
  WeightFiles& operator=(const WeightFiles&) = delete;
  ~WeightFiles() {
    for (auto& [path, f] : files_)
      if (f.size) ::munmap(const_cast<uint8_t*>(f.data), f.size);
  }

  const File& get(const std::string& path) {
    auto it = files_.find(path);
    if (it != files_.end()) return it->second;
    File f;
    f.size = fs::file_size(path);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path + ": " + std::strerror(errno));
    void* p = f.size ? ::mmap(nullptr, f.size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    ::close(fd);
    if (p == MAP_FAILED) fail(path + ": cannot map: " + std::strerror(errno));
    f.data = static_cast<const uint8_t*>(p);
    return files_[path] = f;
  }

 private:
  std::map<std::string, File> files_;
};

struct Segment {
  std::string key;
  // The loader reads these tensors (user-managed: not copied), so they are declared before it and
  // destroyed after it.
  std::unordered_map<std::string, at::Tensor> constants;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

const std::map<std::string, std::pair<at::ScalarType, uint64_t>> kDTypes = {  // name -> (type, item size)
    {"float32", {at::kFloat, 4}}, {"float16", {at::kHalf, 2}}, {"bfloat16", {at::kBFloat16, 2}},
    {"float64", {at::kDouble, 8}}, {"int64", {at::kLong, 8}}, {"int32", {at::kInt, 4}},
    {"int8", {at::kChar, 1}}, {"uint8", {at::kByte, 1}}, {"bool", {at::kBool, 1}}};

// A constant as a view of its bytes in the mapped weight file: {"file", "offset", "bytes", "dtype",
// "shape"} from constants.json. The checks keep the view inside the file and exactly as large as
// its dtype and shape say.
at::Tensor constant_view(const J& c, const Build& build, WeightFiles& weights) {
  auto file = build.weights.find(c["file"].str());
  if (file == build.weights.end()) c["file"].bad("not one of the build's weight files");
  auto dtype = kDTypes.find(c["dtype"].str());
  if (dtype == kDTypes.end()) c["dtype"].bad("unknown dtype");
  const auto [type, itemsize] = dtype->second;
  J shape = c["shape"];
  std::vector<int64_t> dims;
  for (size_t i = 0; i < shape.array_size(); ++i) dims.push_back(shape[i].integer(0));
  const uint64_t n = numel(dims, c.file + ": '" + c.key + "'");
  const uint64_t offset = c["offset"].integer(0), bytes = c["bytes"].integer(0);
  if (bytes % itemsize != 0 || bytes / itemsize != n)  // bytes == numel * itemsize, without overflow
    c["bytes"].bad(std::to_string(bytes) + " bytes, but " + shape_str(dims) + " of " + dtype->first + " needs " +
                   std::to_string(n) + " x " + std::to_string(itemsize));
  if (offset % itemsize != 0) c["offset"].bad("not aligned to the item size");
  const WeightFiles::File& f = weights.get(file->second);
  if (offset > f.size || bytes > f.size - offset)
    c.bad("bytes " + std::to_string(offset) + "+" + std::to_string(bytes) + " lie outside " + file->first + " (" +
          std::to_string(f.size) + " bytes); the bundle is tampered or truncated");
  // from_blob wants a non-const pointer; the mapping is read-only and kernels never write constants
  return at::from_blob(const_cast<uint8_t*>(f.data) + offset, dims, at::TensorOptions().dtype(type));
}

Segment load_segment(const std::string& key, const Build& build, const J& table, WeightFiles& weights) {
  Segment s{key, {}, nullptr};
  auto package = build.package.find(key);
  if (package == build.package.end())
    fail("aoti build " + build.key + " has no package for segment '" + key + "'; the bundle is tampered");
  try {
    s.loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package->second, "model");
  } catch (const c10::Error& e) {
    fail("cannot load " + package->second + " (segment " + key + "): " + e.msg());
  }
  // constants.json must list exactly the constants the package asks for
  if (!table.has(key)) table.bad("no constants for segment '" + key + "'");
  J entries = table[key];
  std::vector<std::string> fqns = s.loader->get_constant_fqns();
  for (const auto& fqn : fqns)
    if (!entries.has(fqn)) entries.bad("has no entry for constant '" + fqn + "' of the package");
  for (const auto& fqn : entries.keys()) {
    if (std::find(fqns.begin(), fqns.end(), fqn) == fqns.end())
      entries.bad("lists constant '" + fqn + "', which the package does not have");
    s.constants[fqn] = constant_view(entries[fqn], build, weights);
  }
  s.loader->load_constants(s.constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);
  return s;
}

at::Tensor run_chain(std::vector<Segment>& segments, const Manifest& m, at::Tensor x) {
  for (Segment& s : segments) {
    // A wrong route (a tampered manifest) would feed a segment a tensor of another width, which
    // its kernels do not check: compare with the input shape the manifest records.
    std::vector<int64_t> want = m.in_shape.at(s.key);
    want.insert(want.begin(), x.size(0));
    if (x.sizes() != at::IntArrayRef(want))
      fail("segment '" + s.key + "' takes " + shape_str(want) + " but gets " + shape_str(x.sizes()) +
           "; the manifest's route is inconsistent, the bundle is tampered");
    // A package reads its input with the (contiguous) strides it was traced with, unchecked, but
    // may return a non-contiguous view (e.g. a stem's flatten(2).transpose(1, 2)).
    std::vector<at::Tensor> out = s.loader->run({x.contiguous()});
    if (out.size() != 1) fail("segment " + s.key + " returned " + std::to_string(out.size()) + " outputs, expected 1");
    x = out[0];
  }
  return x;
}

// ---------------------------------------------------------------------------------------------

int run(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  std::error_code ec;
  const fs::path root = fs::canonical(opt.bundle, ec);
  if (ec || !fs::is_directory(root)) fail(opt.bundle + ": no such bundle folder");

  const Manifest m = read_manifest(root, opt.build);
  const Lut lut = read_lut(root, m, opt.lut);
  const Choice choice = select_config(lut, m, opt);
  const Config& cfg = m.configs.at(choice.id);
  const at::Tensor images = read_npy(opt.input, m);

  // by default, the thread count the latencies were measured with, so the budget means what it says
  // (also the OpenMP thread count of the compiled kernels)
  if (int64_t threads = opt.threads ? opt.threads : lut.threads) at::set_num_threads(static_cast<int>(threads));

  WeightFiles weights;  // declared before the segments: outlives them
  const Value table_doc = parse_json(m.build.constants, "constants table");
  const J table{table_doc, m.build.constants, ""};
  if (table["format"].str() != "stitch-compile-aoti-constants" || table["version"].integer(0) != 1)
    table.bad("not a version 1 stitch-compile-aoti-constants table");
  std::vector<Segment> segments;
  for (const auto& key : cfg.route) segments.push_back(load_segment(key, m.build, table["segments"], weights));

  at::Tensor logits;
  {
    c10::InferenceMode guard;
    logits = run_chain(segments, m, images).contiguous();
  }
  if (logits.scalar_type() != at::kFloat || logits.dim() != 2 || logits.size(0) != images.size(0) ||
      logits.size(1) < 1)
    fail("config " + std::to_string(cfg.id) + " returned " + shape_str(logits.sizes()) + " " +
         c10::toString(logits.scalar_type()) + ", expected float32 logits [batch, classes]");
  const int64_t n = logits.size(0), k = logits.size(1);
  const float* y = logits.data_ptr<float>();

  if (!opt.output.empty()) {
    FILE* f = std::fopen(opt.output.c_str(), "w");
    if (!f) fail(opt.output + ": cannot write: " + std::strerror(errno));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j)
        std::fprintf(f, j + 1 < k ? "%.9g " : "%.9g\n", static_cast<double>(y[i * k + j]));
    if (std::fclose(f) != 0) fail(opt.output + ": cannot write: " + std::strerror(errno));
  }
  std::printf("config %lld: %.3f ms in the LUT%s, accuracy ", static_cast<long long>(cfg.id), choice.ms,
              choice.predicted ? " (predicted)" : "");
  if (cfg.accuracy) std::printf("%g\n", *cfg.accuracy);
  else std::printf("n/a\n");
  for (int64_t i = 0; i < n; ++i) {
    const float* row = y + i * k;
    const int64_t best = std::max_element(row, row + k) - row;
    std::printf("image %lld: class %lld (logit %.6g)\n", static_cast<long long>(i), static_cast<long long>(best),
                static_cast<double>(row[best]));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string msg;
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    msg = e.msg();  // what() would add a C++ backtrace
  } catch (const std::exception& e) {
    msg = e.what();
  }
  for (char& c : msg)  // names from the bundle may hold newlines; the error stays one line
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  return 2;
}
