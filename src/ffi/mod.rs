//! The C ABI (see include/nsa.h). Filled in by the C ABI work.
