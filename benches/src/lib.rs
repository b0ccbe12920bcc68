//! Criterion benchmarks live under `benches/benches/`; this library is empty.
