// The headers precompiled once per build and given to the targets that
// include LibTorch's heavier headers (meson.build, "Precompiled headers"):
// ATen's, whose parsing took about half of such a source file's compile time.
// Never included by name: a source includes what it uses, as it would
// without this file.
#include <ATen/ATen.h>
