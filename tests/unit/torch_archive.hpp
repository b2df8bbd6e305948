// A torch.save archive written from parts, for the tests of the checkpoint
// reader (tests/unit/test_torch_pickle.cpp) and its fuzz run
// (tests/sanitize/fuzz_parsers.cpp): `pickle` as data.pkl, little-endian,
// and the given records (storages under data/N).
#pragma once

#include <caffe2/serialize/inline_container.h>

#include <string>
#include <utility>
#include <vector>

namespace test_support {

inline void write_torch_archive(const std::string& path, const std::string& pickle,
                                const std::vector<std::pair<std::string, std::string>>& records) {
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  writer.writeRecord("byteorder", "little", 6);
  for (const auto& [name, bytes] : records) writer.writeRecord(name, bytes.data(), bytes.size());
  writer.writeEndOfFile();
}

}  // namespace test_support
