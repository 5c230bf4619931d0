// Declares the Batch Norm + activation schemas (schemas.h) in the bnext library.
#include <torch/library.h>

#include "batch_norm_act/schemas.h"

TORCH_LIBRARY_FRAGMENT(bnext, m) { bnext::batch_norm_act::define_schemas(m); }
