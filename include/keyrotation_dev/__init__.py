"""Development tools, not part of the product: loopback servers (OpenBao, moto) and synthetic datasets for
`make demo`, `make up`, the tests and the benchmarks. Nothing under ``keyrotation`` imports this package, and
the image leaves it out (.dockerignore)."""
