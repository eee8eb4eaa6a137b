"""ditkern benchmarks: a registry of op cases (shapes named after real models) and the runner that times them."""
