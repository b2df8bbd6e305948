// Reads files written by Python's torch.save, so that a checkpoint of the
// MLCommons reference loads here (LibTorch's own torch::pickle_load cannot:
// it maps collections.OrderedDict, the type of every state_dict(), to None),
// and writes files in the same format for Python's torch.load.
#pragma once

#include <string>

#include "deepcam/export.hpp"

namespace c10 {
struct IValue;
}

namespace deepcam {

// Reads a file written by Python's torch.save (zip format, pickle protocol 2
// as PyTorch >= 1.6 writes by default; protocols up to 5 are read too).
//   dict, OrderedDict -> c10 generic dict, keys (str or int) in file order; an
//                        OrderedDict's attributes (state_dict()._metadata) are
//                        dropped. The key type is str or int when all keys
//                        are; the value type is Tensor, int, float, bool or
//                        str when all values are; otherwise Any.
//   list -> generic list (element type as for dict values); tuple and
//   torch.Size -> tuple; int, float, bool, str, None -> their IValue; bytes ->
//   a string holding the bytes.
//   tensor -> CPU tensor with its dtype, shape, stride, storage offset,
//   requires_grad and conj/neg bits; tensors that share a storage in the file
//   share it here, and an object saved twice is one tensor.
// Throws deepcam::Error naming the file for anything else (the unsupported
// opcode or global is named), and for a missing, truncated or corrupt file.
DEEPCAM_API c10::IValue load_torch_save(const std::string& path);

// load_torch_save's first check alone, which reads 4 bytes: `path` is a
// readable regular file that begins as a torch.save zip archive. Throws its
// Error otherwise. For a check made before long work (a reader's staging)
// that the file would only be read after.
DEEPCAM_API void check_torch_save_file(const std::string& path);

// Writes `value` as Python's torch.save does (a zip archive holding a
// protocol 2 pickle and one record per tensor storage), which Python's
// torch.load reads with weights_only=True:
//   dict (str or int keys) -> dict; list -> list; tuple -> tuple; int, float,
//   bool, str, None -> their Python value; tensor -> a tensor on the CPU with
//   its dtype, shape, stride, offset and requires_grad (tensors sharing a
//   storage share it in the file).
// Each storage is streamed from the tensor's memory into the file, so saving
// holds no second copy of the data (a tensor on a GPU is copied to the host
// one storage at a time). Written to PATH.tmp-<pid>, flushed to disk and
// renamed over PATH. Throws deepcam::Error naming PATH, and the entry for a
// value it cannot hold; a full disk or the file-size limit (ulimit -f; the
// caller ignores SIGXFSZ) is named as such. On any error the temporary file
// is removed and PATH is untouched.
DEEPCAM_API void save_torch(const std::string& path, const c10::IValue& value);

}  // namespace deepcam
