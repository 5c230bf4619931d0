// Declares the distributed schemas (schemas.h) in the bnext library.
#include <torch/library.h>

#include "distributed/schemas.h"

TORCH_LIBRARY_FRAGMENT(bnext, m) { bnext::distributed::define_schemas(m); }
