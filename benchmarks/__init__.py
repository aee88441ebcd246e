"""Benchmarks, apart from the production code: each prints numbers measured side by side in
one process (like with like) and can write them as JSON. `make bench`, `make bench-kernel`,
`make bench-step`, `make bench-capture`, `make bench-gpu`, `make bench-chat`,
`make bench-ingest`; docs/benchmarks.md has what each measures and the numbers so far."""
