// Symbol visibility for the core library. Everything is built with hidden
// visibility so that one plugin's symbols cannot shadow another's; the core
// exports its API, and the interface classes are exported so that their type
// information is one object shared by host and plugins (dynamic_cast and
// exceptions across libraries depend on it).
#pragma once

#define DEEPCAM_API __attribute__((visibility("default")))
