// Declares the batch renorm schemas (schemas.h) in the bnext library.
#include <torch/library.h>

#include "batch_renorm/schemas.h"

TORCH_LIBRARY_FRAGMENT(bnext, m) { bnext::batch_renorm::define_schemas(m); }
