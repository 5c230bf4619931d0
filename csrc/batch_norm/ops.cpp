// Declares the batch norm schemas (schemas.h) in the bnext library.
#include <torch/library.h>

#include "batch_norm/schemas.h"

TORCH_LIBRARY_FRAGMENT(bnext, m) { bnext::batch_norm::define_schemas(m); }
