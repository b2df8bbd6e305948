// The run file: one TOML file, plus `--set section.key=value` overrides, checked
// in full before anything is built. Sections: [run], [data], [mlperf] (the
// host's own schemas) and [reader], [model], [optimizer], [scheduler] (each
// names a plugin, `name = "..."`, optionally `library = "path"`, and holds
// that plugin's own keys, checked against the plugin's schema). A plugin
// that wraps another declares a ParamType::Plugin key; its value is a nested
// table ([reader.source]) checked the same way, against the nested plugin's
// schema, and `--set reader.source.io=mmap` reaches into it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "deepcam/export.hpp"
#include "deepcam/params.hpp"
#include "deepcam/plugin.hpp"
#include "deepcam/plugin_loader.hpp"

namespace deepcam {

struct PluginChoice {
  PluginKind kind;
  std::string name;
  const LoadedPlugin* plugin = nullptr;
  Params params;
};

// [run] seed = "auto": this value until the engine draws the seed (rank 0,
// from the clock) and puts it into the config and the resolved text.
constexpr std::int64_t kAutoSeed = 0;

struct RunConfig {
  std::string file;
  Params run;
  Params data;
  Params mlperf;
  PluginChoice reader;
  PluginChoice model;
  PluginChoice optimizer;
  PluginChoice scheduler;
  // The configuration with every default filled in, as TOML.
  std::string resolved;
};

// The host's own sections, for --describe run|data|mlperf.
DEEPCAM_API ParamSchema host_schema(const std::string& section);

// Loads, overrides, checks and resolves; loads the named plugins through
// `loader`. Throws Error with "file:line [section] key: ..." messages.
DEEPCAM_API RunConfig load_config(const std::string& file, const std::vector<std::string>& overrides,
                                  PluginLoader& loader);

// Several run files merged left to right (a later file's key replaces an
// earlier one's; a plugin table naming another plugin replaces the earlier
// table whole), then `overrides`. Every message about a key names the file
// and line that set it; the resolved text says, per value, which file set it.
DEEPCAM_API RunConfig load_config(const std::vector<std::string>& files, const std::vector<std::string>& overrides,
                                  PluginLoader& loader);

// Checks one table's values against a schema; exposed for plugin unit tests
// and the generic loader test, which build plugins from their test.toml. A
// schema with a nested plugin table ([reader.source]) needs `loader`.
DEEPCAM_API Params check_table_file(const std::string& file, const std::string& section,
                                    const ParamSchema& schema, PluginLoader* loader = nullptr);

// "did you mean" helper: the closest candidate, or "" when none is close.
DEEPCAM_API std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace deepcam
