// Declares the layer norm schemas (schemas.h) in the bnext library.
#include <torch/library.h>

#include "layer_norm/schemas.h"

TORCH_LIBRARY_FRAGMENT(bnext, m) { bnext::layer_norm::define_schemas(m); }
