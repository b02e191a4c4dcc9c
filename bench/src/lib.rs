//! Benchmarks that need the whole control plane; see `src/bin/`.
