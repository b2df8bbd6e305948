// Unit tests of load_torch_save against files that Python's torch.save writes
// at test time with the project venv: the reference's checkpoint layout, and
// a file with every kind of value, dtype and view the reader handles. Python
// describes what it saved, one line per value, and the loaded IValue must
// describe itself identically. Crafted and damaged files must give an Error.
// LibTorch first: its glog-style CHECK macro must be replaced by doctest's.
#include <torch/types.h>
#undef CHECK
#ifdef CHECK_EQ
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#endif
#include <doctest/doctest.h>

#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include "deepcam/error.hpp"
#include "deepcam/torch_pickle.hpp"
#include "test_paths.hpp"
#include "torch_archive.hpp"

namespace fs = std::filesystem;
using deepcam::load_torch_save;
using namespace std::string_literals;

namespace {

// Writes the test files into argv[1]; NAME.txt describes NAME.pt as
// describe() below does for the loaded IValue.
const char* kWriter = R"PY(
import collections, datetime, os, struct, sys
import torch

out = sys.argv[1]

def describe(obj, path, lines, storages):
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        sid = storages.setdefault(st.data_ptr(), len(storages))
        c = obj.detach().resolve_conj().resolve_neg().contiguous().clone()
        data = bytes(c.untyped_storage().tolist()) if c.numel() else b''
        lines.append((f"{path} tensor {str(obj.dtype)[len('torch.'):]} shape={list(obj.shape)} "
                      f"stride={list(obj.stride())} offset={obj.storage_offset()} "
                      f"grad={int(obj.requires_grad)} conj={int(obj.is_conj())} neg={int(obj.is_neg())} "
                      f"storage={sid}/{st.nbytes()} data={data.hex()}").encode())
    elif isinstance(obj, dict):
        lines.append(f"{path} dict {len(obj)}".encode())
        for k, v in obj.items():
            describe(v, f"{path}[{'i' if isinstance(k, int) else 's'}:{k}]", lines, storages)
    elif isinstance(obj, (list, tuple)):
        lines.append(f"{path} {'list' if isinstance(obj, list) else 'tuple'} {len(obj)}".encode())
        for k, v in enumerate(obj):
            describe(v, f"{path}[{k}]", lines, storages)
    elif obj is None:
        lines.append(f"{path} none".encode())
    elif isinstance(obj, bool):
        lines.append(f"{path} bool {int(obj)}".encode())
    elif isinstance(obj, int):
        lines.append(f"{path} int {obj}".encode())
    elif isinstance(obj, float):
        lines.append(f"{path} float {struct.unpack('<q', struct.pack('<d', obj))[0]}".encode())
    elif isinstance(obj, str):
        lines.append(f"{path} str ".encode() + obj.encode())
    elif isinstance(obj, bytes):
        lines.append(f"{path} str ".encode() + obj)
    else:
        raise TypeError(type(obj))

def save(obj, name, **kw):
    torch.save(obj, os.path.join(out, name + '.pt'), **kw)
    lines = []
    describe(obj, '', lines, {})
    with open(os.path.join(out, name + '.txt'), 'wb') as f:
        f.write(b'\n'.join(lines) + b'\n')

# The reference's checkpoint: a state_dict (OrderedDict with _metadata) with
# BatchNorm's int64 num_batches_tracked, and Adam's state (int keys, 0-dim
# float32 'step', tuple betas, None options).
torch.manual_seed(0)
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
for _ in range(2):
    opt.zero_grad()
    net(torch.randn(2, 3, 6, 6)).square().sum().backward()
    opt.step()
save({'step': 2, 'epoch': 1, 'model': net.state_dict(), 'optimizer': opt.state_dict()}, 'ckpt')

base = torch.arange(12, dtype=torch.float32) * 0.5 - 1
view = base.view(3, 4)[:, 1:3]
c = torch.tensor([1 + 2j, -3 - 0.5j], dtype=torch.complex64)
twice = torch.tensor([7, 8], dtype=torch.int32)
ordered = collections.OrderedDict([('b', 1), ('a', 2)])
ordered.note = 'an attribute, dropped'
mixed = {
    'views': [base, view, view.t(), base[5]],
    'half': torch.tensor([1.5, -2.0, 65504.0], dtype=torch.float16),
    'bf16': torch.tensor([1.0, -0.0078125, 3e38], dtype=torch.bfloat16),
    'bool': torch.tensor([[True, False], [False, True]]),
    'int8': torch.tensor([-128, 127], dtype=torch.int8),
    'uint8': torch.tensor([0, 255], dtype=torch.uint8),
    'int16': torch.tensor([-32768, 32767], dtype=torch.int16),
    'int32': torch.tensor([[-2**31], [2**31 - 1]], dtype=torch.int32),
    'int64': torch.tensor([-2**63, 2**63 - 1]),
    'float64': torch.tensor([0.1, -1e300], dtype=torch.float64),
    'complex': c,
    'conj': c.conj(),
    'neg': torch.tensor([1 + 2j], dtype=torch.complex64).conj().imag,
    'cdouble': torch.tensor([1j], dtype=torch.complex128),
    'uint16': torch.tensor([0, 65535], dtype=torch.uint16),
    'float8': torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
    'param': torch.nn.Parameter(torch.tensor([1.0, 2.0])),
    'grad': torch.tensor([3.0], requires_grad=True),
    'same': [twice, twice],
    'size': torch.Size([2, 3]),
    'nested': (1, (2.5, None), [True, 'x']),
    'ints': [0, -1, 255, 256, 65535, 65536, -2**31, 2**31 - 1, 2**40, -2**63, 2**63 - 1],
    'floats': [0.1, -0.0, float('inf'), float('nan'), 1e-300],
    'text': 'h\u00e9llo \u2713',
    'empty_str': '',
    'bytes': b'ab\x00\xff',
    'no_bytes': b'',
    'empty_list': [],
    'empty_dict': {},
    'empty_tuple': (),
    'int_keys': {3: 'c', -1: 'neg', 2**40: 'big'},
    'ordered': ordered,
    'none': None,
    'yes': True,
    'no': False,
    'empty_tensor': torch.zeros(0, 3),
    'scalar_long': torch.tensor(5),
}
save(mixed, 'mixed')
save(mixed, 'mixed4', pickle_protocol=4)

# Small enough to damage at every byte.
small = torch.arange(6, dtype=torch.float32)
save({'m': net.head.state_dict(), 't': [small, small[2:4]], 'l': [1, 2.5, None, True, 'x', (3,)],
      'k': {0: b'ab'}}, 'small')

# More than 65535 records: the archive's directory is in zip64 form.
torch.save({'t': [torch.tensor([float(i)]) for i in range(66000)]}, os.path.join(out, 'many.pt'))

torch.save(datetime.date(2020, 1, 2), os.path.join(out, 'date.pt'))
torch.save({'a': 1}, os.path.join(out, 'legacy.pt'), _use_new_zipfile_serialization=False)
)PY";

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  REQUIRE_MESSAGE(in, "cannot read " << p);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

// The files, written once per run into a temporary directory.
struct Fixture {
  fs::path dir;
  Fixture() {
    std::string tmpl = (fs::temp_directory_path() / "deepcam_torch_pickle_XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    write_file(dir / "writer.py", kWriter);
    const std::string cmd = fmt::format("'{}' '{}' '{}'", test_support::python(), (dir / "writer.py").string(),
                                        dir.string());
    REQUIRE_MESSAGE(std::system(cmd.c_str()) == 0, "the Python failed: " << cmd);
  }
  // POSIX calls rather than fs::remove_all: at exit that resolves to
  // libtorch's exported copy, which crashes there under AddressSanitizer.
  ~Fixture() {
    if (DIR* d = ::opendir(dir.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
          ::unlink((dir / e->d_name).c_str());
        }
      }
      ::closedir(d);
    }
    ::rmdir(dir.c_str());
  }
  std::string path(const std::string& name) const { return (dir / name).string(); }
};

const Fixture& files() {
  static Fixture f;
  return f;
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kUInt16: return "uint16";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    default: return "?";
  }
}

std::string hex(const void* p, std::size_t n) {
  std::string out;
  for (std::size_t k = 0; k < n; ++k) out += fmt::format("{:02x}", static_cast<const unsigned char*>(p)[k]);
  return out;
}

// The C++ side of the writer's describe().
void describe(const c10::IValue& v, const std::string& path, std::vector<std::string>& lines,
              std::map<const void*, int>& storages) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    const void* impl = t.storage().unsafeGetStorageImpl();
    const int sid = storages.emplace(impl, static_cast<int>(storages.size())).first->second;
    const at::Tensor c = t.detach().resolve_conj().resolve_neg().contiguous();
    lines.push_back(fmt::format(
        "{} tensor {} shape=[{}] stride=[{}] offset={} grad={} conj={} neg={} storage={}/{} data={}", path,
        dtype_name(t.scalar_type()), fmt::join(t.sizes(), ", "), fmt::join(t.strides(), ", "),
        t.storage_offset(), int(t.requires_grad()), int(t.is_conj()), int(t.is_neg()), sid,
        t.storage().nbytes(), c.numel() ? hex(c.data_ptr(), c.nbytes()) : ""));
  } else if (v.isGenericDict()) {
    const auto d = v.toGenericDict();
    lines.push_back(fmt::format("{} dict {}", path, d.size()));
    for (const auto& e : d) {
      const std::string key =
          e.key().isString() ? "s:" + e.key().toStringRef() : "i:" + std::to_string(e.key().toInt());
      describe(e.value(), fmt::format("{}[{}]", path, key), lines, storages);
    }
  } else if (v.isList() || v.isTuple()) {
    const auto items = v.isList() ? v.toListRef() : v.toTupleRef().elements();
    lines.push_back(fmt::format("{} {} {}", path, v.isList() ? "list" : "tuple", items.size()));
    for (std::size_t k = 0; k < items.size(); ++k) {
      describe(items[k], fmt::format("{}[{}]", path, k), lines, storages);
    }
  } else if (v.isNone()) {
    lines.push_back(path + " none");
  } else if (v.isBool()) {
    lines.push_back(fmt::format("{} bool {}", path, int(v.toBool())));
  } else if (v.isInt()) {
    lines.push_back(fmt::format("{} int {}", path, v.toInt()));
  } else if (v.isDouble()) {
    const double d = v.toDouble();
    std::int64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    lines.push_back(fmt::format("{} float {}", path, bits));
  } else if (v.isString()) {
    lines.push_back(path + " str " + v.toStringRef());
  } else {
    lines.push_back(path + " unexpected " + v.tagKind());
  }
}

// Compares the loaded file with what Python said it saved.
void check_matches_python(const std::string& name, const std::string& manifest) {
  const c10::IValue loaded = load_torch_save(files().path(name));
  std::vector<std::string> got;
  std::map<const void*, int> storages;
  describe(loaded, "", got, storages);
  std::vector<std::string> want;
  const std::string text = read_file(files().path(manifest));
  for (std::size_t at = 0, nl; (nl = text.find('\n', at)) != std::string::npos; at = nl + 1) {
    want.push_back(text.substr(at, nl - at));
  }
  REQUIRE(want.size() > 10);
  CHECK(got.size() == want.size());
  for (std::size_t k = 0; k < std::min(got.size(), want.size()); ++k) {
    if (got[k] != want[k]) {
      CHECK(got[k] == want[k]);  // the first difference is the useful one
      break;
    }
  }
}

c10::IValue at_key(const c10::IValue& dict, const std::string& key) {
  const auto d = dict.toGenericDict();
  REQUIRE_MESSAGE(d.contains(key), "missing key " << key);
  return d.at(key);
}

std::string error_of(const std::string& path) {
  try {
    load_torch_save(path);
  } catch (const deepcam::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// Pickle fragments for hand-made files.
std::string le32(std::uint32_t v) {
  std::string s(4, '\0');
  for (int k = 0; k < 4; ++k) s[k] = static_cast<char>((v >> (8 * k)) & 0xff);
  return s;
}
std::string str(const std::string& s) { return "X" + le32(static_cast<std::uint32_t>(s.size())) + s; }
std::string int1(int v) { return std::string("K") + static_cast<char>(v); }

// A float32 tensor of `size` elements at `offset` in storage '0' of `numel` elements.
std::string tensor_pickle(int numel, int offset, int size) {
  return std::string("\x80\x02") + "ctorch._utils\n_rebuild_tensor_v2\n" + "((" + str("storage") +
         "ctorch\nFloatStorage\n" + str("0") + str("cpu") + int1(numel) + "tQ" + int1(offset) + int1(size) +
         "\x85" + int1(1) + "\x85" + "\x89" + "ccollections\nOrderedDict\n)R" + "tR.";
}


}  // namespace

TEST_CASE("a reference checkpoint loads with every value as Python saved it") {
  check_matches_python("ckpt.pt", "ckpt.txt");

  const c10::IValue top = load_torch_save(files().path("ckpt.pt"));
  REQUIRE(top.isGenericDict());
  std::vector<std::string> keys;
  for (const auto& e : top.toGenericDict()) keys.push_back(e.key().toStringRef());
  CHECK(keys == std::vector<std::string>{"step", "epoch", "model", "optimizer"});
  CHECK(at_key(top, "step").toInt() == 2);
  CHECK(at_key(top, "epoch").toInt() == 1);

  // The state_dict's OrderedDict is a plain dict of str -> tensor; _metadata is gone.
  const auto model = at_key(top, "model").toGenericDict();
  CHECK((model.keyType()->kind() == c10::TypeKind::StringType));
  CHECK((model.valueType()->kind() == c10::TypeKind::TensorType));
  CHECK(!model.contains("_metadata"));
  CHECK(model.size() == 10);
  const at::Tensor nbt = model.at("bn.num_batches_tracked").toTensor();
  CHECK((nbt.scalar_type() == at::kLong));
  CHECK(nbt.dim() == 0);
  CHECK(nbt.item<std::int64_t>() == 2);
  CHECK((model.at("conv.weight").toTensor().sizes() == at::IntArrayRef{4, 3, 3, 3}));

  const c10::IValue optimizer = at_key(top, "optimizer");
  const auto state = at_key(optimizer, "state").toGenericDict();
  CHECK((state.keyType()->kind() == c10::TypeKind::IntType));
  CHECK(state.size() == 7);
  const at::Tensor step = at_key(state.at(0), "step").toTensor();
  CHECK((step.scalar_type() == at::kFloat));
  CHECK(step.dim() == 0);
  CHECK(step.item<float>() == 2.0f);
  const c10::IValue group = at_key(optimizer, "param_groups").toListRef().at(0);
  const auto betas = at_key(group, "betas");
  REQUIRE(betas.isTuple());
  CHECK(betas.toTupleRef().elements().at(0).toDouble() == 0.9);
  CHECK(betas.toTupleRef().elements().at(1).toDouble() == 0.999);
  CHECK(at_key(group, "foreach").isNone());
  CHECK(at_key(group, "amsgrad").toBool() == false);
  CHECK(at_key(group, "params").toIntVector() == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6});
}

TEST_CASE("every value kind, dtype and view loads as Python saved it") {
  check_matches_python("mixed.pt", "mixed.txt");
  // Protocol 4 adds FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL and raw bytes.
  check_matches_python("mixed4.pt", "mixed.txt");

  const c10::IValue top = load_torch_save(files().path("mixed.pt"));
  const auto views = at_key(top, "views").toTensorVector();
  REQUIRE(views.size() == 4);
  for (const auto& v : views) CHECK(v.is_alias_of(views[0]));
  CHECK(views[1].storage_offset() == 1);
  CHECK((views[1].strides() == at::IntArrayRef{4, 1}));
  CHECK((views[2].strides() == at::IntArrayRef{1, 4}));
  CHECK(views[3].dim() == 0);
  CHECK(views[3].item<float>() == 1.5f);
  views[0].add_(1);  // one storage, as in Python
  CHECK(views[1].select(0, 0).select(0, 0).item<float>() == 0.5f);

  const auto same = at_key(top, "same").toTensorVector();
  CHECK(same.at(0).is_same(same.at(1)));
  CHECK(at_key(top, "complex").toTensor().is_alias_of(at_key(top, "conj").toTensor()));
  CHECK(at_key(top, "conj").toTensor().is_conj());
  const at::Tensor half = at_key(top, "half").toTensor();
  CHECK((half.scalar_type() == at::kHalf));
  CHECK(half.to(at::kFloat).equal(torch::tensor({1.5f, -2.0f, 65504.0f})));
  CHECK(at_key(top, "param").toTensor().requires_grad());
  CHECK(!at_key(top, "half").toTensor().requires_grad());

  CHECK(at_key(top, "size").isTuple());
  CHECK(at_key(top, "bytes").toStringRef() == std::string("ab\0\xff", 4));
  CHECK(at_key(top, "ints").toIntVector().back() == INT64_MAX);
  CHECK((at_key(top, "int_keys").toGenericDict().keyType()->kind() == c10::TypeKind::IntType));
  CHECK(at_key(top, "int_keys").toGenericDict().at(std::int64_t{1} << 40).toStringRef() == "big");
  std::vector<std::string> ordered;
  for (const auto& e : at_key(top, "ordered").toGenericDict()) ordered.push_back(e.key().toStringRef());
  CHECK(ordered == std::vector<std::string>{"b", "a"});
}

TEST_CASE("a missing, foreign, legacy or damaged file gives an Error naming it") {
  const std::string missing = files().path("missing.pt");
  CHECK(error_of(missing).find(missing + ": cannot open") == 0);

  const std::string text = files().path("text.pt");
  write_file(text, "hello, this is not a zip archive\n");
  CHECK(error_of(text).find(text + ": not a torch.save file") == 0);

  const std::string legacy = files().path("legacy.pt");
  CHECK(error_of(legacy).find(legacy + ": a bare pickle") == 0);

  // (It was "not a torch.save file (not a zip archive)".)
  const std::string folder = files().path("folder.pt");
  std::filesystem::create_directories(folder);
  CHECK(error_of(folder) == folder + ": a folder, not a checkpoint file");

  // Cut short anywhere, the archive is refused: its directory is at the end.
  const std::string whole = read_file(files().path("ckpt.pt"));
  const std::string cut = files().path("cut.pt");
  for (std::size_t n : {std::size_t{1}, std::size_t{4}, std::size_t{100}, whole.size() / 2, whole.size() - 30,
                        whole.size() - 1}) {
    write_file(cut, whole.substr(0, n));
    const std::string e = error_of(cut);
    CHECK_MESSAGE(e.find(cut + ": ") == 0, "cut at " << n << ": " << e);
  }
}

TEST_CASE("a record whose bytes differ from the archive's CRC-32 is refused naming it") {
  // One flipped bit in a weight loaded as another weight: LibTorch's reader
  // does not compare the checksums.
  auto flipped = [](const std::string& from, const std::string& record, std::size_t at, char bits) {
    caffe2::serialize::PyTorchStreamReader reader(from);
    const std::size_t offset = reader.getRecordOffset(record) + at;
    std::string bytes = read_file(from);
    bytes[offset] = static_cast<char>(bytes[offset] ^ bits);
    const std::string path = files().path("flipped.pt");
    write_file(path, bytes);
    return path;
  };
  const std::string ckpt = files().path("ckpt.pt");
  REQUIRE(load_torch_save(ckpt).isGenericDict());
  std::string path = flipped(ckpt, "data/0", 5, 0x40);
  CHECK(error_of(path).find(path + ": record 'data/0' fails its CRC-32 check") == 0);
  // In the pickle: "epoch" read as "epocH" is still a pickle.
  caffe2::serialize::PyTorchStreamReader reader(ckpt);
  auto [data, n] = reader.getRecord("data.pkl");
  const std::string text(static_cast<const char*>(data.get()), n);
  REQUIRE(text.find("epoch") != std::string::npos);
  path = flipped(ckpt, "data.pkl", text.find("epoch") + 4, 0x20);
  CHECK(error_of(path).find(path + ": record 'data.pkl' fails its CRC-32 check") == 0);

  // Zip64's directory is read too.
  const std::string many = files().path("many.pt");
  const auto tensors = at_key(load_torch_save(many), "t").toTensorVector();
  REQUIRE(tensors.size() == 66000);
  CHECK(tensors[65999].item<float>() == 65999.0f);
  path = flipped(many, "data/65999", 0, 0x01);
  CHECK(error_of(path).find(path + ": record 'data/65999' fails its CRC-32 check") == 0);
}

TEST_CASE("an unsupported global is named") {
  const std::string date = files().path("date.pt");
  const std::string e = error_of(date);
  CHECK(e.find(date + ": data.pkl byte ") == 0);
  CHECK(e.find("unsupported global datetime.date") != std::string::npos);
}

TEST_CASE("hand-made pickles: what torch.save never writes is refused with the reason") {
  const std::string path = files().path("crafted.pt");
  const std::string eight_bytes(8, '\0');
  auto error_for = [&](const std::string& pickle, const std::string& storage = std::string(8, '\0')) {
    test_support::write_torch_archive(path, pickle, {{"data/0", storage}});
    return error_of(path);
  };

  test_support::write_torch_archive(path, tensor_pickle(2, 0, 2), {{"data/0", eight_bytes}});
  CHECK((load_torch_save(path).toTensor().sizes() == at::IntArrayRef{2}));

  CHECK(error_for(tensor_pickle(2, 1, 2)).find("does not fit its storage '0' of 8 bytes") != std::string::npos);
  CHECK(error_for(tensor_pickle(3, 0, 2)).find("holds 8 bytes, the pickle declares 12") != std::string::npos);
  CHECK(error_for("\x80\x02I1\n."s).find("unsupported pickle opcode INT (0x49)") != std::string::npos);
  CHECK(error_for("\x80\x02" "a."s).find("APPEND on an empty stack") != std::string::npos);
  CHECK(error_for("\x80\x02]q\x00h\x00" "a."s).find("a list contains itself") != std::string::npos);
  CHECK(error_for("\x80\x02]"s).find("ends without STOP") != std::string::npos);
  CHECK(error_for("\x80\x02\x8a\x09"s + std::string(9, '\x01') + ".").find("does not fit in 64 bits") !=
        std::string::npos);
  CHECK(error_for("\x80\x02]q\x00h\x01."s).find("memo entry 1 was never stored") != std::string::npos);
  CHECK(error_for("\x80\x02}K\x01K\x02s" "K\x03s."s).find("SETITEM on an empty stack") != std::string::npos);
  CHECK(error_for("\x80\x02" "ctorch\nFloatStorage\n."s).find("holds torch.FloatStorage itself") !=
        std::string::npos);

  // Nesting deep enough to overflow a recursive walk is refused, not a crash.
  const std::size_t depth = 200000;
  const std::string deep = "\x80\x02"s + std::string(depth, ']') + std::string(depth - 1, 'a') + ".";
  CHECK(error_for(deep).find("nest deeper than") != std::string::npos);

  // The storage record the pickle names must exist.
  test_support::write_torch_archive(path, tensor_pickle(2, 0, 2), {{"data/1", eight_bytes}});
  CHECK(error_of(path).find("no record 'data/0'") != std::string::npos);
}

TEST_CASE("the opcodes torch.save's default protocol leaves out are read too") {
  const std::string storage_id = "((" + str("storage") + "ctorch\nFloatStorage\n" + str("0") + str("cpu") +
                                 int1(2) + "tQ";
  const std::string v1_tensor = "ctorch._utils\n_rebuild_tensor\n" + storage_id + int1(0) + int1(2) + "\x85" +
                                int1(1) + "\x85" + "tR";
  const std::string pickle =
      "\x80\x02("s +                                                                    // MARK for DICT
      str("a") + int1(1) +                                                            //
      str("b") + "(" + int1(2) + int1(3) + "l" +                                      // LIST
      str("c") + "U\x01z" +                                                           // SHORT_BINSTRING
      str("d") + "T" + le32(4) + "long" +                                             // BINSTRING
      str("e") + "B" + le32(4) + "byte" +                                             // BINBYTES
      str("f") + "\x8d" + le32(2) + le32(0) + "u8" +                                  // BINUNICODE8
      str("g") + "\x8b" + le32(2) + "\x00\x01"s +                                     // LONG4
      str("h") + "ccollections\nOrderedDict\n)\x81" +                                 // NEWOBJ
      str("i") + int1(9) + "r" + le32(1000) + "0" + "j" + le32(1000) +                // LONG_BINPUT/GET, POP
      str("j") + "N20" +                                                              // DUP, POP
      str("k") + "(" + int1(5) + "1)" +                                               // POP_MARK
      str("l") + "\x8a\x02\x00\x80"s +                                                // LONG1, negative
      str("t") + v1_tensor +                                                          // _rebuild_tensor
      str("p") + "ctorch._utils\n_rebuild_parameter\n(" + v1_tensor + "\x88" +        // _rebuild_parameter
      "ccollections\nOrderedDict\n)RtR" +                                             //
      "d.";                                                                           // DICT
  const std::string path = files().path("rare.pt");
  float values[2] = {0.25f, -4.0f};
  test_support::write_torch_archive(path, pickle, {{"data/0", std::string(reinterpret_cast<const char*>(values), sizeof values)}});
  const c10::IValue top = load_torch_save(path);
  std::vector<std::string> keys;
  for (const auto& e : top.toGenericDict()) keys.push_back(e.key().toStringRef());
  CHECK(keys == std::vector<std::string>{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "t", "p"});
  CHECK(at_key(top, "a").toInt() == 1);
  CHECK(at_key(top, "b").toIntVector() == std::vector<std::int64_t>{2, 3});
  CHECK(at_key(top, "c").toStringRef() == "z");
  CHECK(at_key(top, "d").toStringRef() == "long");
  CHECK(at_key(top, "e").toStringRef() == "byte");
  CHECK(at_key(top, "f").toStringRef() == "u8");
  CHECK(at_key(top, "g").toInt() == 256);
  CHECK(at_key(top, "h").toGenericDict().size() == 0);
  CHECK(at_key(top, "i").toInt() == 9);
  CHECK(at_key(top, "j").isNone());
  CHECK(at_key(top, "k").toTupleRef().elements().size() == 0);
  CHECK(at_key(top, "l").toInt() == -32768);
  const at::Tensor t = at_key(top, "t").toTensor();
  const at::Tensor p = at_key(top, "p").toTensor();
  CHECK(t.equal(torch::tensor({0.25f, -4.0f})));
  CHECK(!t.requires_grad());
  CHECK(p.requires_grad());
  CHECK(p.is_alias_of(t));
}

TEST_CASE("a damaged pickle gives an Error or a value, never a crash") {
  caffe2::serialize::PyTorchStreamReader reader(files().path("small.pt"));
  std::vector<std::pair<std::string, std::string>> records;
  for (const auto& name : reader.getAllRecords()) {
    if (name.rfind("data/", 0) != 0) continue;
    auto [data, n] = reader.getRecord(name);
    records.emplace_back(name, std::string(static_cast<const char*>(data.get()), n));
  }
  auto [data, n] = reader.getRecord("data.pkl");
  const std::string pickle(static_cast<const char*>(data.get()), n);
  REQUIRE(pickle.size() > 200);

  const std::string path = files().path("damaged.pt");
  test_support::write_torch_archive(path, pickle, records);
  REQUIRE(load_torch_save(path).isGenericDict());

  int errors = 0, loaded = 0, other = 0;
  auto attempt = [&](const std::string& bad) {
    test_support::write_torch_archive(path, bad, records);
    try {
      load_torch_save(path);
      ++loaded;
    } catch (const deepcam::Error& e) {
      ++errors;
      if (std::string(e.what()).find(path + ": ") != 0) ++other;
    } catch (...) {
      ++other;
    }
  };
  for (std::size_t len = 0; len < pickle.size(); ++len) attempt(pickle.substr(0, len));
  CHECK(loaded == 0);  // STOP is the last byte: every shorter pickle is incomplete
  for (std::size_t k = 0; k < pickle.size(); ++k) {
    for (unsigned char b : {0x00, 0xff, 0x7f ^ static_cast<unsigned char>(pickle[k])}) {
      std::string bad = pickle;
      bad[k] = static_cast<char>(b);
      attempt(bad);
    }
  }
  CHECK(other == 0);
  CHECK(errors > static_cast<int>(pickle.size()));
}

// ---------------------------------------------------------------------------
// save_torch: what it writes, Python's torch.load(weights_only=True) reads as
// the same values; what it cannot write is named; a write that fails leaves
// no file behind.

namespace {

// The keys of mixed.pt that save_torch cannot write as they are: tensors
// with the conj or neg bit, dtypes without a legacy storage class, and
// bytes (which load as a string of raw bytes).
const std::vector<std::string> kNotWritten = {"conj", "neg", "uint16", "float8", "bytes", "no_bytes"};

c10::IValue without_unwritable(const c10::IValue& top) {
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  for (const auto& e : top.toGenericDict()) {
    const std::string key = e.key().toStringRef();
    if (std::find(kNotWritten.begin(), kNotWritten.end(), key) == kNotWritten.end()) out.insert(key, e.value());
  }
  return out;
}

// Python describes ORIGINAL less kNotWritten and what it reads from RESAVED,
// as kWriter's describe() does; exits 0 when they are the same.
const char* kCompare = R"PY(
import sys, torch
src = open(sys.argv[3]).read().split("def save(")[0]
ns = {}
exec(src.replace("out = sys.argv[1]", "out = None"), ns)
original = torch.load(sys.argv[1], weights_only=False)  # ours, with bytes, which weights_only refuses
for k in sys.argv[4].split(","):
    original.pop(k, None)
resaved = torch.load(sys.argv[2], weights_only=True)
want, got = [], []
ns["describe"](original, "", want, {})
ns["describe"](resaved, "", got, {})
if want != got:
    for w, g in zip(want, got):
        if w != g:
            print("want", w[:200], "\ngot ", g[:200])
            break
    print(len(want), len(got))
    sys.exit(1)
print("same", len(want))
)PY";

}  // namespace

TEST_CASE("save_torch writes what Python's torch.load reads back as the same values") {
  const c10::IValue mixed = without_unwritable(load_torch_save(files().path("mixed.pt")));
  const std::string resaved = files().path("resaved.pt");
  deepcam::save_torch(resaved, mixed);
  // Our reader sees the same structure, storages shared as before.
  const c10::IValue back = load_torch_save(resaved);
  const auto views = at_key(back, "views").toTensorVector();
  REQUIRE(views.size() == 4);
  for (const auto& v : views) CHECK(v.is_alias_of(views[0]));
  CHECK((views[2].strides() == at::IntArrayRef{1, 4}));
  CHECK(at_key(back, "ints").toIntVector() == at_key(mixed, "ints").toIntVector());
  // Python: every value, dtype, view, stride and shared storage as it saved them.
  write_file(files().path("compare.py"), kCompare);
  std::string dropped;
  for (const auto& k : kNotWritten) dropped += (dropped.empty() ? "" : ",") + k;
  const std::string cmd =
      fmt::format("'{}' '{}' '{}' '{}' '{}' '{}'", test_support::python(), files().path("compare.py"),
                  files().path("mixed.pt"), resaved, files().path("writer.py"), dropped);
  CHECK_MESSAGE(std::system(cmd.c_str()) == 0, "Python read another value back: " << cmd);
  CHECK(!fs::exists(resaved + ".tmp-" + std::to_string(::getpid())));
}

TEST_CASE("save_torch names a value it cannot write and leaves no file") {
  const c10::IValue top = load_torch_save(files().path("mixed.pt"));
  const std::string path = files().path("refused.pt");
  auto error_saving = [&](const std::string& key) -> std::string {
    c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
    d.insert("entry", at_key(top, key));
    try {
      deepcam::save_torch(path, d);
    } catch (const deepcam::Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  CHECK(error_saving("conj").find(path + ": cannot save ['entry']: it has the conj or neg bit set") == 0);
  CHECK(error_saving("uint16").find("['entry']: it has dtype UInt16") != std::string::npos);
  CHECK(!fs::exists(path));
}

TEST_CASE("save_torch over the file-size limit: an Error naming the limit, no file, the old one kept") {
  const std::string path = files().path("limited.pt");
  write_file(path, "the previous checkpoint");
  c10::impl::GenericDict d(c10::StringType::get(), c10::AnyType::get());
  d.insert("big", torch::ones({1 << 20}));  // 4 MiB
  struct sigaction ignore {}, old {};
  ignore.sa_handler = SIG_IGN;
  ::sigaction(SIGXFSZ, &ignore, &old);
  rlimit before{};
  ::getrlimit(RLIMIT_FSIZE, &before);
  rlimit limited = before;
  limited.rlim_cur = 1 << 20;  // 1 MiB
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &limited) == 0);
  std::string message = "(no error)";
  try {
    deepcam::save_torch(path, d);
  } catch (const deepcam::Error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &before);
  ::sigaction(SIGXFSZ, &old, nullptr);
  CHECK(message.find(path + ": cannot write: File too large") == 0);
  CHECK(message.find("file-size limit, ulimit -f") != std::string::npos);
  CHECK(read_file(path) == "the previous checkpoint");
  CHECK(!fs::exists(path + ".tmp-" + std::to_string(::getpid())));
  // Within the limit the same call succeeds.
  deepcam::save_torch(path, d);
  CHECK(load_torch_save(path).toGenericDict().at("big").toTensor().equal(torch::ones({1 << 20})));
}
